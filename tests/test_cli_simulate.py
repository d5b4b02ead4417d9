"""`magral simulate` on the toy learner: files written, resumption, errors naming the bad flag."""

from __future__ import annotations


def test_command_line_runs_the_toy_protocol_and_resumes(tmp_path, capsys) -> None:
    from magral_core.cli import main

    argv = ["simulate", "--learner", "toy", "--toy-pool", "40", "--strategies", "random,coreset",
            "--seeds", "0", "--initial", "5", "--budget", "5", "--rounds", "2", "--full-pool",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "results.csv", "summary.md", "curve.png"}
    assert len(list((tmp_path / "rounds").rglob("round*.json"))) == 2 * 3
    first = (tmp_path / "results.csv").read_text()
    assert main(argv) == 0 and (tmp_path / "results.csv").read_text() == first
    assert main([*argv[:6], "bald", *argv[7:]]) == 2
    assert "unknown ['bald']" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path)]) == 2  # the detector learner needs --data
