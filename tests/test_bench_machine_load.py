"""MachineLoad and cpu_model: the host, CPU steal and busy shares every latency benchmark reports beside its
numbers."""

import vla_stack.bench as bench
from vla_stack.bench import MachineLoad, cpu_model


def _stat(user, idle, steal):
    # user nice system idle iowait irq softirq steal guest guest_nice
    return f"cpu  {user} 0 0 {idle} 0 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"


def test_steal_and_busy_shares_over_the_window(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    monkeypatch.setattr(bench, "_PROC_STAT", stat)
    stat.write_text(_stat(user=1000, idle=5000, steal=100))
    with MachineLoad() as load:
        stat.write_text(_stat(user=1500, idle=5300, steal=300))  # +500 user, +300 idle, +200 steal
    summary = load.summary()
    assert summary["cpu_steal_pct"] == 20.0 and summary["cpu_busy_pct"] == 50.0
    assert summary["load_avg_1m"] >= 0


def test_unreadable_proc_stat_gives_none_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_PROC_STAT", tmp_path / "missing")
    with MachineLoad() as load:
        pass
    assert load.summary()["cpu_steal_pct"] is None
    assert MachineLoad().summary()["cpu_busy_pct"] is None  # never entered


def test_cpu_model_names_the_host_and_its_vector_isa(tmp_path, monkeypatch):
    import torch

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t: fpu\n")
    monkeypatch.setattr(bench, "_PROC_CPUINFO", info)
    assert cpu_model() == f"AMD EPYC 9B14 ({torch.backends.cpu.get_cpu_capability()})"
    monkeypatch.setattr(bench, "_PROC_CPUINFO", tmp_path / "missing")
    assert cpu_model().endswith(f"({torch.backends.cpu.get_cpu_capability()})")
