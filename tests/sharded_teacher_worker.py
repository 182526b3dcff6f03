"""One rank of a tiny DistilTrainer run, for tests/test_sharded_teacher.py: run alone, or under
``accelerate launch`` (DDP, FSDP2 or DeepSpeed ZeRO, gloo on CPU). Trains a 2-layer student from a 4-layer
teacher for 3 steps on 48 fixed examples in order (the same global batches at any process
count) and writes ``OUT/rank<N>.json``: how the teacher was placed (sharded or not, its
local share of the parameters, eval mode, gradients, optimizer membership, wrapper), the
logged losses, and the teacher's logits on fixed inputs against an unsharded copy."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from conftest import tiny_bert  # noqa: E402

from distilkit import DistilConfig, DistilTrainer  # noqa: E402
from distilkit.sharding import is_sharded  # noqa: E402

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def main(out_dir: str, mode: str = "plain", global_batch: int = 8) -> None:
    """``mode``: ``plain`` (the trainer places the teacher as the launch says), ``sharded``
    or ``offload`` (the teacher sharded with FSDP2 over the processes first, its shards
    in CPU memory with ``offload``), ``unjoined`` (several processes left unjoined:
    ``use_cpu=False`` without a GPU)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    world = int(os.environ.get("WORLD_SIZE", "1"))
    teacher = tiny_bert(seed=0, layers=4, **NO_DROPOUT)
    teacher.classifier.weight.data *= 40  # logits worth distilling
    reference = tiny_bert(seed=0, layers=4, **NO_DROPOUT)
    reference.classifier.weight.data *= 40
    student = tiny_bert(seed=1, layers=2, **NO_DROPOUT).train()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(5, 120, (int(n),), generator=g).tolist(),
             "labels": int(i % 2)}
            for i, n in enumerate(torch.randint(4, 12, (48,), generator=g))]
    for row in data:
        row["attention_mask"] = [1] * len(row["input_ids"])
    from distilkit.collate import DistilCollator

    if mode != "plain":
        from distilkit.sharding import shard_teacher

        shard_teacher(teacher, torch.device("cpu"), world, offload=mode == "offload")

    args = DistilConfig(output_dir=os.path.join(out_dir, "trainer"), report_to=[],
                        save_strategy="no", max_steps=3, logging_steps=1, learning_rate=1e-3,
                        per_device_train_batch_size=global_batch // world, alpha_kd=1.0,
                        alpha_ce=0.0, temperature=2.0, seed=0, use_cpu=world > 1 and mode != "unjoined",
                        train_sampling_strategy="sequential", disable_tqdm=True)
    trainer = DistilTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                            data_collator=DistilCollator(pad_token_id=0))
    trainer.train()
    t = trainer.teachers[0]
    params = list(t.parameters())
    in_optimizer = {id(p) for grp in trainer.optimizer.param_groups for p in grp["params"]}
    x = torch.randint(5, 120, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = t(input_ids=x).logits
        want = reference(input_ids=x).logits
    # A ZeRO-3 parameter's own partition is ``ds_tensor`` (the parameter itself is empty
    # outside a gather), its whole size ``ds_numel``; those under the persistence threshold
    # (``ds_persist``) stay whole on every rank.
    split = [p for p in params if hasattr(p, "ds_tensor") and not p.ds_persist]
    local = sum(p.ds_tensor.numel() if any(p is q for q in split) else
                getattr(p, "ds_numel", None) or
                (p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    whole = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    report = {
        "world": world, "mode": mode, "rank": int(os.environ.get("RANK", "0")),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "teacher_class": type(t).__name__, "teacher_sharded": is_sharded(t),
        # measured after the forward above: the gathered layers were freed again
        "teacher_local_fraction": local / whole,
        "teacher_partitioned_fraction": sum(p.ds_numel for p in split) / whole,
        "teacher_partitioned_local_fraction": (sum(p.ds_tensor.numel() for p in split)
                                               / max(sum(p.ds_numel for p in split), 1)),
        "teacher_partitioned_gathered": any(p.data.numel() > 0 for p in split),
        "teacher_fsdp_units": sum(isinstance(m, FSDPModule) for m in t.modules()),
        "teacher_training": t.training or any(m.training for m in t.modules()),
        "teacher_requires_grad": any(p.requires_grad for p in params),
        "teacher_grads": any(p.grad is not None for p in params),
        "teacher_in_optimizer": any(id(p) in in_optimizer for p in params),
        "teacher_is_ddp": isinstance(t, torch.nn.parallel.DistributedDataParallel),
        "student_wrapper": type(trainer.model_wrapped).__name__,
        "teacher_logits_max_diff": float((got - want).abs().max()),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    with open(os.path.join(out_dir, f"rank{report['rank']}.json"), "w") as f:
        json.dump(report, f)
    from distilkit.device import end_process_group

    end_process_group()   # as distilkit's CLI does: left to the exit, ZeRO-2 could abort


if __name__ == "__main__":
    main(*sys.argv[1:])
