"""A DistilTrainer run on CUDA with a bf16 student (TrainingArguments.bf16) and a bf16
teacher (teacher_dtype): finite losses, models where they belong, the KD term in fp32."""
import math

import torch
from datasets import Dataset

from conftest import cpu_conftest
from distilkit import DistilConfig, DistilTrainer, losses


def test_bf16_distillation_step_on_cuda(tmp_path, monkeypatch):
    kd_dtypes = []
    real = losses.soft_target_kl
    monkeypatch.setattr(losses, "soft_target_kl",
                        lambda *a, **kw: kd_dtypes.append((out := real(*a, **kw)).dtype) or out)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 120, (64, 12), generator=g)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * 64,
                            "labels": (ids[:, 1] > 60).long().tolist()})
    student, teacher = cpu_conftest.tiny_bert(), cpu_conftest.tiny_bert(seed=1)
    args = DistilConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16,
                        max_steps=4, report_to=[], save_strategy="no", disable_tqdm=True,
                        learning_rate=1e-3, logging_steps=1, bf16=True, teacher_dtype="bfloat16")
    tr = DistilTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds)
    t = tr.teachers[0]
    assert {p.device.type for p in t.parameters()} == {"cuda"}
    assert {p.dtype for p in t.parameters()} == {torch.bfloat16}
    tr.train()
    assert next(student.parameters()).is_cuda
    logged = [h for h in tr.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(math.isfinite(h[k]) for h in logged
                                    for k in ("loss", "loss_kd", "loss_ce"))
    assert kd_dtypes == [torch.float32] * 4
