"""The launch files: every accelerate config under launch/accelerate/ loads with accelerate's own loader
and resolves to the intended process layout, and the SLURM example is valid bash that starts the right
command on every node (run with stub srun/scontrol/accelerate, so nothing trains)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import ComputeEnvironment, DistributedType

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "launch" / "accelerate"
SBATCH = ROOT / "launch" / "slurm" / "spcl_2nodes.sbatch"

# file -> (num_processes in all, num_machines, distributed_type)
EXPECTED = {
    "cpu_2proc.yaml": (2, 1, DistributedType.MULTI_GPU),  # a real gloo group of 2 CPU processes
    "gpu_1.yaml": (1, 1, DistributedType.NO),
    "gpu_8.yaml": (8, 1, DistributedType.MULTI_GPU),
    "gpu_2nodes.yaml": (16, 2, DistributedType.MULTI_GPU),
}

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_every_accelerate_config_has_expectations() -> None:
    assert sorted(p.name for p in ACCELERATE.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_loads_with_the_expected_layout(name: str) -> None:
    path = ACCELERATE / name
    config = load_config_from_file(str(path))
    processes, machines, kind = EXPECTED[name]
    assert (config.num_processes, config.num_machines, config.distributed_type) == (processes, machines, kind)
    assert config.compute_environment == ComputeEnvironment.LOCAL_MACHINE
    assert processes % machines == 0
    # The scripts pass Accelerator(mixed_precision=<recipe amp>), which overrides the file: a value here
    # other than 'no' would only mislead.
    assert config.mixed_precision == "no"
    assert f"accelerate launch --config_file launch/accelerate/{name}" in path.read_text()  # usage header


def test_launch_resolves_the_per_node_placeholders() -> None:
    """accelerate launch's own argument handling: the command line's machine rank and main address win
    over the two-node file's placeholders, and each node starts 8 of the 16 processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", str(ACCELERATE / "gpu_2nodes.yaml"), "--machine_rank", "1",
            "--main_process_ip", "node-a", "pretrain/spcl.py", "--config", "recipe.yaml"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert (args.multi_gpu, args.num_processes, args.num_machines, args.machine_rank) == (True, 16, 2, 1)
    prepare_multi_gpu_env(args)  # machine rank 1: no port check on this machine
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "2", 1)
    assert "node-a" in (getattr(args, "master_addr", "") or getattr(args, "rdzv_endpoint", ""))

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(ACCELERATE / "gpu_8.yaml"), "--num_processes", "4", "pretrain/spcl.py"]))
    assert (args.multi_gpu, args.num_processes) == (True, 4)


@needs_bash
def test_sbatch_is_valid_bash_and_names_existing_files() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    named = set(re.findall(r"(?:launch|pretrain)/[\w./-]+\.(?:yaml|py)", text))
    assert {"launch/accelerate/gpu_2nodes.yaml", "launch/configs/spcl_dm_osnet_lup.yaml", "pretrain/spcl.py"} <= named
    assert [n for n in sorted(named) if not (ROOT / n).is_file()] == []
    # The allocation matches the accelerate config: nodes x GPUs per node = processes, one task per node.
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M)[1])
    gpus = int(re.search(r"^#SBATCH --gres=gpu:(\d+)$", text, re.M)[1])
    config = load_config_from_file(str(ACCELERATE / "gpu_2nodes.yaml"))
    assert (nodes, nodes * gpus) == (config.num_machines, config.num_processes)
    assert re.search(r"^#SBATCH --ntasks-per-node=1$", text, re.M)
    assert re.search(r"^#SBATCH --requeue$", text, re.M)


@needs_bash
def test_sbatch_overrides_load_as_a_spcl_config() -> None:
    from reidforge.pretrain.spcl import SpCLConfig
    from reidforge.shared.config import load_config

    line = re.search(r"^OVERRIDES=\((.*)\)", SBATCH.read_text(), re.M)[1]
    overrides = [item for item in shlex.split(line) if item != "$@"]
    cfg = load_config(SpCLConfig, ROOT / "launch" / "configs" / "spcl_dm_osnet_lup.yaml", overrides)
    # An epoch stays one pass over the 2,090,122 kept images at a global batch of 16 processes x P x K.
    assert cfg.iters_per_epoch == 2_090_122 // (16 * cfg.data.p * cfg.data.k)
    assert (cfg.output_dir, cfg.run_name) == ("runs", "spcl_dm_osnet_lup")  # the script's RUN_DIR


def _stubbed_run(tmp_path: Path, *args: str) -> list[list[str]]:
    """Run the sbatch script with stub srun (both node ranks in turn), scontrol and accelerate; return
    the accelerate command line of each node."""
    bin_dir, log = tmp_path / "bin", tmp_path / "accelerate.log"
    bin_dir.mkdir(exist_ok=True)
    stubs = {
        "srun": 'while [[ "$1" == --* ]]; do shift; done\nfor node in 0 1; do SLURM_NODEID=$node "$@"; done\n',
        "scontrol": 'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-a01\\ngpu-a02\\n"; fi\n',
        "accelerate": f'printf "%s\\n" "$*" >> {shlex.quote(str(log))}\n',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    log.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu-a[01-02]"}
    subprocess.run(["bash", str(SBATCH), *args], env=env, check=True, capture_output=True, text=True, timeout=60)
    return [line.split() for line in log.read_text().splitlines()]


@needs_bash
def test_sbatch_starts_one_launcher_per_node_and_resumes_when_requeued(tmp_path: Path) -> None:
    first = _stubbed_run(tmp_path, "seed=3")
    assert len(first) == 2
    for rank, argv in enumerate(first):
        assert argv[:3] == ["launch", "--config_file", "launch/accelerate/gpu_2nodes.yaml"]
        assert argv[argv.index("--machine_rank") + 1] == str(rank)
        assert argv[argv.index("--main_process_ip") + 1] == "gpu-a01"
        script = argv.index("pretrain/spcl.py")
        assert argv[script + 1:script + 3] == ["--config", "launch/configs/spcl_dm_osnet_lup.yaml"]
        assert "--resume" not in argv and argv[-1] == "seed=3"  # no checkpoint yet; user overrides last

    checkpoints = tmp_path / "runs" / "spcl_dm_osnet_lup" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest").write_text("epoch-0003")
    again = _stubbed_run(tmp_path)
    assert len(again) == 2 and all("--resume" in argv for argv in again)
