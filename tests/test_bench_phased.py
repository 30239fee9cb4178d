"""bench/phased.py end to end: a phased student and the SFD student on it are each trained once; the same
command again reads their rows back, and SFD on another phased student trains anew."""

from conftest import bench_script

from distill_core.builtin import fingerprint
from distill_core.config import DistillConfig
from distill_core.student_files import load_student
from distill_core.train.run import STUDENT_FILE


def test_the_phased_bench_keeps_its_students_and_sfd_follows_the_best_one(tmp_path, capsys):
    bench = bench_script("phased")

    def argv(k):
        return ["--K", str(k), "--partitions", "uniform", "--alphas", "dt", "--smoothing", "0", "--S", "2",
                "--iters", "2", "--batch", "4", "--n", "8", "--ref-steps", "3", "--no-reference", "--sfd-iters", "2",
                "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "runs")]

    first = bench.main(argv(2))
    assert [(r["method"], r.get("K")) for r in first][:2] == [("phased", 2), ("sfd", None)]
    capsys.readouterr()
    assert bench.main(argv(2)) == first  # training seconds too: read back, not trained again
    assert capsys.readouterr().out.count("its rows are read from") == 2

    bench.main(argv(3))  # another phased student, so SFD distils another teacher
    out = capsys.readouterr().out
    assert "its rows are read from" not in out and "going on from its checkpoint" not in out
    sfd = DistillConfig.from_yaml(tmp_path / "runs" / "sfd" / "config.yaml")
    base = load_student(tmp_path / "runs" / "K3-uniform-dt-ema0" / STUDENT_FILE, bench.builtin_source().denoiser)
    assert sfd.extra == {"teacher_student": fingerprint(base.net.denoiser)}
