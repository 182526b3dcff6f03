"""Teachers under data parallelism, in real gloo processes on CPU launched by ``accelerate
launch`` with the shipped configs (tests/sharded_teacher_worker.py is one rank): with DDP the
teacher is replicated in eval mode, never wrapped in DDP, and gets no gradients; under an
FSDP2 launch (fsdp2_cpu_2proc.yaml) the trainer shards it itself (distilkit.sharding) and each
rank holds half of it; under DeepSpeed ZeRO-3 (deepspeed_zero3_cpu_2proc.yaml) the trainer
partitions it and each rank holds half of every partitioned parameter; under ZeRO-2 it is
replicated. In every case the student trains exactly as one process trains it.

What runs but proves little here: CPU offload of FSDP2 shards is a copy from CPU to CPU.
accelerate 1.15 takes neither FSDP nor DeepSpeed on CPU by itself (it drops their plugins for
MULTI_CPU runs); distilkit.sharding.engine_on_cpu gives them back, which these tests cover."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import tiny_bert, tiny_t5

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "sharded_teacher_worker.py")
CONFIGS = os.path.join(HERE, "..", "recipes", "accelerate")
CPU_2PROC = os.path.join(CONFIGS, "cpu_2proc.yaml")
FSDP2_CPU = os.path.join(CONFIGS, "fsdp2_cpu_2proc.yaml")
ZERO3_CPU = os.path.join(CONFIGS, "deepspeed_zero3_cpu_2proc.yaml")


def _launch(out, mode="plain", processes=2, config=CPU_2PROC, flags=()):
    os.makedirs(out)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launch = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
               *flags] if processes == 2 else [sys.executable])
    # its own session, so that a timeout ends torchrun's workers too
    proc = subprocess.Popen([*launch, WORKER, str(out), mode], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, err


def _run(out, mode="plain", processes=2, config=CPU_2PROC, flags=()):
    code, err = _launch(out, mode, processes, config, flags)
    assert code == 0, err[-3000:]
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(processes)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _run(str(tmp_path_factory.mktemp("one") / "out"), processes=1)[0]


def _teacher_only_infers(r):
    assert not r["teacher_training"] and not r["teacher_requires_grad"]
    assert not r["teacher_grads"] and not r["teacher_in_optimizer"] and not r["teacher_is_ddp"]
    assert r["teacher_logits_max_diff"] == 0.0


def test_ddp_replicates_the_teacher_in_eval_mode_without_gradients(one_process, tmp_path):
    ranks = _run(str(tmp_path / "ddp"))
    assert len(one_process["losses"]) == 3
    for r in ranks:
        assert r["distributed_type"] == "DistributedType.MULTI_CPU" and r["world"] == 2
        assert r["student_wrapper"] == "DistributedDataParallel"
        assert not r["teacher_sharded"] and r["teacher_local_fraction"] == 1.0
        _teacher_only_infers(r)
        # the same global batches of 8 (4 per process): the same losses as one process
        assert r["losses"] == pytest.approx(one_process["losses"], rel=1e-5)


@pytest.mark.parametrize("mode", ["sharded", "offload"])
def test_an_fsdp2_sharded_teacher_trains_the_student_a_whole_one_does(one_process, tmp_path, mode):
    ranks = _run(str(tmp_path / mode), mode)
    for r in ranks:
        assert r["teacher_sharded"] and r["teacher_class"].startswith("FSDP")
        # each rank keeps half of every parameter, also after a forward (gathered layers
        # are freed again); one FSDP unit per encoder layer, the embeddings, and the rest
        assert r["teacher_local_fraction"] == pytest.approx(0.5, abs=0.01)
        assert r["teacher_fsdp_units"] == 4 + 1 + 1
        _teacher_only_infers(r)
        assert r["student_wrapper"] == "DistributedDataParallel"
        assert r["losses"] == pytest.approx(one_process["losses"], rel=1e-5)


def test_an_fsdp2_launch_on_cpu_processes_makes_the_trainer_shard_the_teacher(one_process,
                                                                            tmp_path):
    # accelerate alone would drop the FSDP plugin (MULTI_CPU): no sharding at all
    ranks = _run(str(tmp_path / "fsdp2"), config=FSDP2_CPU,
                 flags=["--fsdp_transformer_layer_cls_to_wrap", "BertLayer"])
    for r in ranks:
        assert r["distributed_type"] == "DistributedType.FSDP" and r["world"] == 2
        # the trainer's FSDP2 branch: the teacher sharded, one unit per layer, half per rank
        assert r["teacher_sharded"] and r["teacher_class"] == "FSDPBertForSequenceClassification"
        assert r["teacher_local_fraction"] == pytest.approx(0.5, abs=0.01)
        assert r["teacher_fsdp_units"] == 4 + 1 + 1
        _teacher_only_infers(r)
        # and the student trained fully sharded by accelerate
        assert r["student_wrapper"] == "FSDPBertForSequenceClassification"
        assert r["losses"] == pytest.approx(one_process["losses"], rel=1e-5)


def test_a_deepspeed_zero3_launch_partitions_the_teacher_for_inference(one_process, tmp_path):
    ranks = _run(str(tmp_path / "zero3"), config=ZERO3_CPU)
    for r in ranks:
        assert r["distributed_type"] == "DistributedType.DEEPSPEED" and r["world"] == 2
        assert r["teacher_sharded"] and r["teacher_class"] == "DeepSpeedEngine"
        # every weight matrix is partitioned (biases and norms, at most 10 x the width of
        # 32 elements, stay whole); each rank holds half of each partitioned parameter,
        # after a forward too (gathered parameters are released)
        assert r["teacher_partitioned_fraction"] > 0.9
        assert r["teacher_partitioned_local_fraction"] == 0.5
        assert not r["teacher_partitioned_gathered"]
        assert r["teacher_local_fraction"] == pytest.approx(
            0.5 * r["teacher_partitioned_fraction"] + 1 - r["teacher_partitioned_fraction"])
        _teacher_only_infers(r)  # its logits equal the unsharded teacher's
        assert r["student_wrapper"] == "DeepSpeedEngine"
        assert r["losses"] == pytest.approx(one_process["losses"], rel=1e-5)


def test_with_deepspeed_zero2_the_teacher_is_replicated(one_process, tmp_path):
    ranks = _run(str(tmp_path / "zero2"), config=ZERO3_CPU, flags=["--zero_stage", "2"])
    for r in ranks:
        assert r["distributed_type"] == "DistributedType.DEEPSPEED"
        assert not r["teacher_sharded"] and r["teacher_local_fraction"] == 1.0
        assert r["teacher_class"] == "BertForSequenceClassification"
        _teacher_only_infers(r)
        assert r["student_wrapper"] == "DeepSpeedEngine"
        assert r["losses"] == pytest.approx(one_process["losses"], rel=1e-5)


def test_cpu_processes_left_unjoined_are_refused_before_training(tmp_path):
    # use_cpu=False without a GPU: accelerate counts one process in each, which would train
    # alone on all the data
    code, err = _launch(str(tmp_path / "unjoined"), "unjoined")
    assert code != 0
    assert ("use_cpu: launched as 2 processes but they were not joined (no GPU, and use_cpu "
            "is false); set use_cpu: true") in err
    assert not [f for f in os.listdir(tmp_path / "unjoined") if f.startswith("rank")]


def test_the_zero3_teacher_config_keeps_the_runs_partitioning_and_sizes_auto_to_the_teacher():
    from distilkit.sharding import zero3_inference_config

    run = {"zero_optimization": {
        "stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
        "offload_optimizer": {"device": "cpu"}, "overlap_comm": True,
        "stage3_param_persistence_threshold": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_max_live_parameters": 10 ** 8, "reduce_bucket_size": "auto"}}
    assert zero3_inference_config(run, hidden_size=64) == {
        "stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
        "stage3_max_live_parameters": 10 ** 8,
        "stage3_param_persistence_threshold": 640, "stage3_prefetch_bucket_size": 3686}
    # the run's own numbers win; no width known: DeepSpeed's defaults
    run["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    got = zero3_inference_config(run, hidden_size=None)
    assert got["stage3_param_persistence_threshold"] == 0
    assert "stage3_prefetch_bucket_size" not in got and "offload_optimizer" not in got


def test_the_units_gathered_one_at_a_time_are_the_models_layers():
    from distilkit.sharding import teacher_layers

    bert = tiny_bert(layers=3)  # BertModel's _no_split_modules: BertEmbeddings, BertLayer
    assert teacher_layers(bert) == [*list(bert.bert.encoder.layer)[::-1], bert.bert.embeddings]
    lstm_like = torch.nn.Sequential(torch.nn.Embedding(9, 4),
                                    torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]))
    # a model transformers knows nothing of: the blocks of its first ModuleList
    assert teacher_layers(lstm_like) == list(lstm_like[1])[::-1]
    t5 = tiny_t5()  # T5Block, encoder's and decoder's, innermost (last) first
    got = teacher_layers(t5)
    assert {type(m).__name__ for m in got} == {"T5Block"}
    assert len(got) == len(t5.encoder.block) + len(t5.decoder.block) and got[-1] is t5.encoder.block[0]


@pytest.mark.parametrize("config,flags", [
    (FSDP2_CPU, ["--fsdp_transformer_layer_cls_to_wrap", "BertLayer"]), (ZERO3_CPU, [])],
    ids=["fsdp2", "zero3"])
def test_distilkit_distill_under_a_sharded_launch_finishes_with_the_teachers_figures(
        tiny_task, config, flags):
    """The whole run, not only the training steps: `accelerate launch` with the FSDP2 or the
    ZeRO-3 config and `-m distilkit distill`. The sharded teacher's forwards are collectives,
    so the main process evaluating it alone waited for the other for ever (FSDP2: the run
    trained, saved the student, then hung); now every process evaluates it together. Under
    ZeRO-3 transformers also built the saved student partitioned when the main process
    loaded it to score it (a broadcast per parameter): it hung there. Both fail on the old
    code by the timeout."""
    import yaml

    out = str(tiny_task["tmp"] / "run")
    recipe = {"name": "tiny_fsdp", "teacher": tiny_task["teacher"],
              "student": {"type": "from_teacher", "num_layers": 2}, "dataset": None,
              "data_files": tiny_task["data_files"], "max_length": 16, "alpha_kd": 0.5,
              "alpha_ce": 0.5, "temperature": 2.0, "max_steps": 3,
              "per_device_train_batch_size": 4, "learning_rate": 1e-3, "output_dir": out,
              "use_cpu": True}
    path = tiny_task["tmp"] / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
         *flags, "-m", "distilkit", "distill",
         str(path), "--no-progress"], env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"distilkit distill under {os.path.basename(config)} did not finish in 300 s")
    assert proc.returncode == 0, err[-3000:]
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["processes"] == 2 and res["global_steps"] == 3
    from distilkit.evaluate import saved_parameters

    # the sharded teacher counted whole (each process's shard summed), as one process counts it
    assert res["teacher"]["parameters"] == saved_parameters(tiny_task["teacher"])
    assert 0.0 <= res["teacher"]["accuracy"] <= 1.0
    assert 0.0 <= res["student"]["accuracy"] <= 1.0
    assert os.path.isfile(os.path.join(out, "student", "model.safetensors"))
