"""GeoLoRA inside ``transformers.Trainer``.

    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizers=(geolora.GeoLoRAOptimizer(model, lr=args.learning_rate), None),
                      callbacks=[GeoLoRACallback()])

The optimizer is a ``torch.optim.Optimizer`` whose ``state_dict`` holds everything the step needs, and every
layer's rank travels in the model's ``state_dict``, so Trainer checkpoints and ``resume_from_checkpoint``
restore ranks, factors and optimizer state as they are. The callback puts the total rank, the parameters in
use and every layer's rank into each log entry, ahead of the reporting callbacks (W&B, TensorBoard, ...).
"""

from __future__ import annotations

import inspect

from transformers import TrainerCallback

from ..model import count_trainable, rank_entries, ranks


class GeoLoRACallback(TrainerCallback):
    """Adds ``geolora/total_rank``, ``geolora/trainable_params`` and ``geolora/rank/<layer>`` to every log.

    Trainer calls callbacks in order and puts the reporting ones before those passed in ``callbacks=``; so
    that they see the ranks, this callback moves itself to the front of the trainer's callbacks when the
    trainer is built (``on_init_end``)."""

    def on_init_end(self, args, state, control, **kwargs):
        caller = inspect.currentframe().f_back
        handler = caller.f_locals.get("self") if caller is not None else None
        callbacks = getattr(handler, "callbacks", None)
        if isinstance(callbacks, list) and self in callbacks:
            callbacks.remove(self)
            callbacks.insert(0, self)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None:
            return
        entries = rank_entries(ranks(model), count_trainable(model))
        logs.update(entries)
        if state.log_history:  # Trainer appended its copy of ``logs`` just before calling the callbacks
            state.log_history[-1].update(entries)
