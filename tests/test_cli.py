"""The shared flags (``add_losparse_args``, ``validate_losparse_args``) and ``check_distributed_support``."""
import argparse

import pytest

import utils
from core_helpers import QKV, schedule_args


def _parse(argv):
    return utils.add_losparse_args(argparse.ArgumentParser()).parse_args(argv)


def test_add_losparse_args_defaults():
    a = _parse([])
    assert (a.low_rank_parameter_ratio, a.initial_threshold, a.final_threshold, a.initial_warmup, a.final_warmup,
            a.warmup_steps, a.beta1, a.beta2, a.deltaT, a.eval_checkpoint, a.structured_method,
            a.structured_direction, a.pruner_name, a.svd, a.no_losparse) == \
           (0.05, 1.0, 0.1, 1, 3, 6400, 0.85, 1.0, 10, None, "mean", "row", "PLATON", "full", False)
    utils.validate_losparse_args(a)


@pytest.mark.parametrize("argv,flag", [
    (["--final_threshold", "1.5"], "--final_threshold"),
    (["--final_threshold", "0"], "--final_threshold"),
    (["--low_rank_parameter_ratio", "0"], "--low_rank_parameter_ratio"),
    (["--initial_threshold", "0.5", "--final_threshold", "0.6"], "--final_threshold"),
    (["--deltaT", "0"], "--deltaT"),
    (["--beta1", "1.0"], "--beta1"),
    (["--beta2", "-1"], "--beta2"),
    (["--warmup_steps", "-5"], "--warmup_steps"),
])
def test_validate_names_the_flag(argv, flag):
    with pytest.raises(ValueError, match=flag):
        utils.validate_losparse_args(_parse(argv))


def test_validate_warmups_fit_in_run():
    a = _parse(["--warmup_steps", "100"])
    utils.validate_losparse_args(a, total_step=401)
    with pytest.raises(ValueError, match="--initial_warmup .*--final_warmup .*--warmup_steps"):
        utils.validate_losparse_args(a, total_step=400)
    b = _parse(["--no_losparse", "--final_threshold", "0.5"])
    utils.validate_losparse_args(b, total_step=10)


def test_missing_gradients_raise_instead_of_silently_skipping():
    model = QKV()
    utils.substitute_layer_weights(model, ["query"], [], parameter_ratio=0.2)
    pr = utils.Pruner(model, schedule_args(), total_step=40)
    with pytest.raises(RuntimeError, match="no sparse parameter has a gradient"):
        pr.update_and_pruning(model, 3)


@pytest.mark.parametrize("dtype,ok", [("NO", True), ("MULTI_GPU", True), ("MULTI_CPU", True),
                                      ("DEEPSPEED", False), ("FSDP", False), ("MEGATRON_LM", False)])
def test_check_distributed_support(dtype, ok):
    from accelerate.utils import DistributedType

    fake = argparse.Namespace(distributed_type=DistributedType(dtype))
    if ok:
        utils.check_distributed_support(fake)
    else:
        with pytest.raises(RuntimeError, match=f"distributed_type={dtype}.*Supported: a single process"):
            utils.check_distributed_support(fake)


def test_check_distributed_support_refuses_lone_processes(monkeypatch):
    """torchrun on a machine where accelerate does not initialise torch.distributed: N independent runs."""
    from accelerate.utils import DistributedType

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 but accelerate runs this process alone"):
        utils.check_distributed_support(argparse.Namespace(distributed_type=DistributedType.NO, num_processes=1))
    utils.check_distributed_support(argparse.Namespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2))
    monkeypatch.setenv("WORLD_SIZE", "1")
    utils.check_distributed_support(argparse.Namespace(distributed_type=DistributedType.NO, num_processes=1))
