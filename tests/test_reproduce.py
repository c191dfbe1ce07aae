"""`make reproduce-tables PROFILE=smoke`: every table and figure built from real (tiny) runs."""
import json

from experiments import reproduce


def test_smoke_profile_builds_every_table_and_figure_and_skips_finished_runs(tmp_path, caplog):
    reproduce.main(["--profile", "smoke", "--out", str(tmp_path)])
    tables, figures = tmp_path / "tables", tmp_path / "figures"
    for name in ("smoke_methods.md", "smoke_methods.tex", "smoke_initial_rank.md", "smoke_robustness.md"):
        assert (tables / name).is_file(), name
    for name in ("smoke_initial_rank.png", "smoke_robustness.png"):
        assert (figures / name).stat().st_size > 1000, name

    methods = (tables / "smoke_methods.md").read_text()
    for method in ("lora", "adalora", "geolora"):
        assert f"| movie_reviews | {method} | accuracy |" in methods
    assert "±" in methods and "| 2 |" in methods  # two seeds each
    assert "—" in methods  # no paper number for the stand-in task
    assert "$\\pm$" in (tables / "smoke_methods.tex").read_text()
    robustness = (tables / "smoke_robustness.md").read_text()
    assert "| adalora | 1000 | nan | nan |" in robustness  # lr 1e3 diverges: shown as nan, not dropped
    assert (tables / "smoke_initial_rank.md").read_text().count("| 2 |") == 1

    run_dirs = sorted((tmp_path / "runs" / "smoke").glob("*/*/summary.json"))
    assert len(run_dirs) == 6 + 2 + 8
    for summary in run_dirs:
        assert json.loads((summary.parent / "point.json").read_text())["method"] in methods
        assert summary.parent.name in (tables / f"smoke_{summary.parent.parent.name}.md").read_text()

    stamps = {p: p.stat().st_mtime_ns for p in run_dirs}
    caplog.set_level("INFO")
    reproduce.main(["--profile", "smoke", "--out", str(tmp_path)])
    assert {p: p.stat().st_mtime_ns for p in run_dirs} == stamps  # finished runs are not run again
    assert caplog.text.count("(done)") == len(run_dirs)
