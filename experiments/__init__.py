"""Hydra experiment harness around the geolora library: models x tasks x methods, logged runs."""
