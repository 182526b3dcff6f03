"""Teachers under data parallelism, in real gloo processes on CPU (tests/sharded_teacher_worker.py
is one rank): with DDP the teacher is replicated in eval mode, never wrapped in DDP, and gets
no gradients; sharded with FSDP2 (distilkit.sharding) each rank holds half of it, gathers one
layer at a time, and the student trains exactly as with a replicated teacher, and as one
process trains it.

What does not run here: accelerate's own FSDP mode (distributed_type: FSDP, which makes the
trainer shard the teacher by itself) is only taken with accelerators (accelerate 1.15 turns
the FSDP plugin on for MULTI_GPU / XPU / ... launches, never for MULTI_CPU), so these tests
shard the teacher with the same function before handing it to the trainer; CPU offload of the
shards runs but is a copy from CPU to CPU here; DeepSpeed ZeRO-3 is not installed."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_bert, tiny_t5

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "sharded_teacher_worker.py")
CPU_2PROC = os.path.join(HERE, "..", "recipes", "accelerate", "cpu_2proc.yaml")


def _run(out, mode="plain", processes=2):
    os.makedirs(out)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    launch = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC]
              if processes == 2 else [sys.executable])
    proc = subprocess.run([*launch, WORKER, str(out), mode], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
