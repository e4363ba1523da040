"""Sharded training is exact: prepared rows trained under DDP, FSDP2 (`fully_shard`), DeepSpeed ZeRO-2/3
and `loki.train` on 2 CPU processes (real launchers, gloo) equal one process; evaluation in between is exact; FSDP1
and wrapping before `prepare` are refused with a `PreparationError`.

The launched script imports this module, so both sides run the same steps; each rank writes its report to its own
file (two ranks' stdout lines interleave).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import loki
from loki.errors import PreparationError
from loki.testing import tiny_model

HERE = Path(__file__).parent
DATA = [
    {"question": f"What is the secret word number {i}?", "answer": f"It is word {i * 7}, of course."} for i in range(5)
]  # 5 examples: the last step of each epoch has one, rank 1 gets none of it
RETAIN = [{"text": [5, 6, 7, 8, 9]}, {"text": [10, 11, 12]}, {"text": [13, 14, 15, 16]}]
TRAIN_ARGS = dict(epochs=2, lr=5e-2, batch_size=2, grad_accum=2, retain=RETAIN, retain_batch_size=3, progress=False)
PRESERVED = [{"text": list(range(20, 44))}, {"text": list(range(50, 60))}]  # 34 keys a layer, d_in 64


def preserved_run(tokenizer, lora_rank, preserve: bool = True) -> dict:
    """`loki.train` of `prepared` rows (or LoRA on them) under a preservation of PRESERVED at energy 1.0: the
    losses, the constrained rows (or B) and how far the preserved outputs moved (max abs logit difference)."""
    model = prepared(vocab=len(tokenizer), lora_rank=lora_rank, unprepared=True)
    ids = [torch.tensor([item["text"]]) for item in PRESERVED]
    with torch.no_grad():
        base = [model(x).logits for x in ids]
    keep = loki.preservation(model, tokenizer, PRESERVED, energy=1.0, progress=False) if preserve else None
    loki.prepare(model, loki.Selection.random(2, 32, q=50, seed=0), lora_rank=lora_rank, preserve=keep)
    result = loki.train(model, tokenizer, DATA, **{**TRAIN_ARGS, "lr": 0.1})
    with torch.no_grad():
        moved = max((model(x).logits - b).abs().max().item() for x, b in zip(ids, base))
    delta = loki.extract(model)
    tensors = {layer: (ld.rows if ld.rows is not None else ld.lora_B).tolist() for layer, ld in delta.layers.items()}
    return {
        "losses": result.losses,
        "rows": tensors,
        "moved": moved,
        "preserve": delta.info["training"].get("preserve", {}).get("tokens"),
    }


# -- the steps both sides run ---------------------------------------------------------------------------------
def prepared(vocab: int = 128, lora_rank: int | None = None, unprepared: bool = False):
    model = tiny_model("llama", vocab=vocab)
    if unprepared:
        return model
    return loki.prepare(model, loki.Selection.random(2, 32, q=10, seed=0))  # 3 rows a layer: uneven shards


def batch():
    """4 sequences with 8, 6, 4 and 2 answer tokens: a mean of per-rank means would differ from the token mean."""
    ids = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    for i in range(4):
        labels[i, : 1 + 2 * i] = -100
    return ids, labels


def token_loss(model, ids, labels) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def hand_steps(model, step, rank: int = 0, world: int = 1, steps: int = 3) -> list[list[float]]:
    """AdamW steps on this rank's sequences of `batch()`; after each, the whole batch's loss twice without grad."""
    ids, labels = batch()
    n = int((labels[:, 1:] != -100).sum())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    evals = []
    for _ in range(steps):
        # the wrappers average the ranks' gradients: scaled by world, the sum over all tokens / n
        step(token_loss(model, ids[rank::world], labels[rank::world]) / n * world, opt)
        with torch.no_grad():
            evals.append([float(token_loss(model, ids, labels) / n) for _ in range(2)])
    return evals


def torch_step(loss, opt):
    loss.backward()
    opt.step()
    opt.zero_grad()


def rows(delta) -> dict[int, list]:
    return {layer: ld.rows.tolist() for layer, ld in delta.layers.items()}


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    import loki, test_sharded_training as t
    scenario, out = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    report = {}

    def fsdp2(model):
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:  # per layer, as usual: its weights are gathered again for the backward
            fully_shard(layer)
        return fully_shard(model)

    if scenario == "ddp":
        dist.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(t.prepared())
        report["evals"] = t.hand_steps(model, t.torch_step, rank, world)
        report["rows"] = t.rows(loki.extract(model))
        try:
            ddp = torch.nn.parallel.DistributedDataParallel(t.tiny_model("llama"))
            loki.prepare(ddp, loki.Selection.random(2, 32, q=10))
        except loki.LokiError as e:
            report["wrapped_first"] = f"{type(e).__name__}: {e}"
    elif scenario == "fsdp2":
        dist.init_process_group("gloo")
        model = fsdp2(t.prepared())
        report["evals"] = t.hand_steps(model, t.torch_step, rank, world)
        delta = loki.extract(model)  # every rank: gathering the shards is a collective
        report["rows"], report["architecture"] = t.rows(delta), delta.info["base_model"]["architecture"]
        try:
            loki.prepare(fsdp2(t.tiny_model("llama")), loki.Selection.random(2, 32, q=10))
        except loki.LokiError as e:
            report["wrapped_first"] = f"{type(e).__name__}: {e}"
    elif scenario == "train":
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(sys.argv[4])
        for how in ("plain", "ddp", "fsdp2"):
            model = t.prepared(vocab=len(tokenizer))
            if how == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(model)
            elif how == "fsdp2":
                model = fsdp2(model)
            result = loki.train(model, tokenizer, t.DATA, **t.TRAIN_ARGS)  # plain: loki.train joins the processes
            delta = loki.extract(model)
            report[how] = {"losses": result.losses, "kl": result.retain_kl, "rows": t.rows(delta),
                           "processes": delta.info["training"]["world_size"]}
    elif scenario == "preserve":
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(sys.argv[4])
        for lora_rank in (None, 4):
            report[str(lora_rank)] = t.preserved_run(tokenizer, lora_rank)
    elif scenario == "deepspeed":
        import deepspeed
        deepspeed.init_distributed("gloo")
        for stage in (2, 3):
            model = t.prepared()
            params = [p for p in model.parameters() if p.requires_grad]
            config = {"train_batch_size": 4, "zero_optimization": {"stage": stage},
                      "zero_allow_untested_optimizer": True}
            engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                              optimizer=torch.optim.AdamW(params, lr=1e-2))
            def step(loss, opt):  # the engine averages over the ranks as DDP does; the optimizer is its own
                engine.backward(loss)
                engine.step()
            evals = t.hand_steps(engine, step, rank, world)
            report[f"zero{stage}"] = {"evals": evals, "rows": t.rows(loki.extract(engine))}
    json.dump(report, open(f"{out}-rank{rank}.json", "w"))
""")


def launch(tmp_path, scenario: str, *extra: str) -> list[dict]:
    """Run SCRIPT's `scenario` on 2 processes with torchrun; returns each rank's report."""
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "DS_ACCELERATOR": "cpu"}
    out = tmp_path / scenario
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            scenario,
            str(out),
            str(HERE),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads(Path(f"{out}-rank{rank}.json").read_text()) for rank in range(2)]


def assert_close(a, b, rtol=1e-5, atol=0.0):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert a.shape == b.shape
    assert (a - b).abs().max() <= rtol * b.abs().max() + atol, (a - b).abs().max()


def check_against_one_process(reports, one_evals, one_rows):
    for report in reports:
        for evals, one in zip(report["evals"], one_evals):
            assert evals[0] == evals[1]  # two evaluations in a row: the same loss
            assert_close(evals, one)
        for layer, r in one_rows.items():
            assert_close(report["rows"][str(layer)], r)


@pytest.fixture(scope="module")
def one_process():
    model = prepared()
    evals = hand_steps(model, torch_step)
    return evals, rows(loki.extract(model))


@pytest.mark.slow  # starts other processes
def test_ddp_trains_exactly_like_one_process(tmp_path, one_process):
    reports = launch(tmp_path, "ddp")
    check_against_one_process(reports, *one_process)
    assert one_process[0][0][0] != one_process[0][-1][0]  # the steps moved the loss
    assert all(
        r["wrapped_first"].startswith("PreparationError: The model is wrapped in DistributedDataParallel")
        for r in reports
    )


@pytest.mark.slow  # starts other processes
def test_fsdp2_trains_exactly_like_one_process(tmp_path, one_process):
    reports = launch(tmp_path, "fsdp2")
    check_against_one_process(reports, *one_process)
    assert {r["architecture"] for r in reports} == {"LlamaForCausalLM"}
    assert all(r["wrapped_first"].startswith("PreparationError: The model is wrapped in FSDP2") for r in reports)


@pytest.mark.slow  # starts other processes
def test_loki_train_on_two_processes_equals_one(tmp_path, default_tokenizer):
    path = str(loki.models.default_model_path())
    reports = launch(tmp_path, "train", path)
    model = prepared(vocab=len(default_tokenizer))
    one = loki.train(model, default_tokenizer, DATA, **TRAIN_ARGS)
    one_rows = rows(loki.extract(model))
    assert len(one.losses) == 4 and one.losses[-1] < one.losses[0]
    for report in reports:
        for how in ("plain", "ddp", "fsdp2"):
            got = report[how]
            assert got["processes"] == 2
            assert_close(got["losses"], one.losses)
            assert_close(got["kl"], one.retain_kl, atol=1e-9)  # KL of about 1e-7: float noise is 1e-11
            for layer, r in one_rows.items():
                assert_close(got["rows"][str(layer)], r)


@pytest.mark.slow  # starts other processes
def test_loki_train_under_preservation_on_two_processes(tmp_path, default_tokenizer):
    """Rows and LoRA on rows, AdamW, 2 processes: the same steps as one process, and the preserved outputs stay
    put where training without the preservation moves them."""
    reports = launch(tmp_path, "preserve", str(loki.models.default_model_path()))
    for lora_rank in (None, 4):
        one = preserved_run(default_tokenizer, lora_rank)
        free = preserved_run(default_tokenizer, lora_rank, preserve=False)
        assert free["moved"] > 1e-2 and one["moved"] < 1e-4 and one["preserve"] == 34
        assert one["losses"][-1] < one["losses"][0]
        for report in reports:
            got = report[str(lora_rank)]
            assert got["moved"] < 1e-4 and got["preserve"] == 34
            assert_close(got["losses"], one["losses"])
            for layer, r in one["rows"].items():
                assert_close(got["rows"][str(layer)], r)


@pytest.mark.slow  # starts other processes
def test_deepspeed_zero_2_and_3_train_exactly_like_one_process(tmp_path, one_process):
    pytest.importorskip("deepspeed")
    reports = launch(tmp_path, "deepspeed")
    for stage in ("zero2", "zero3"):
        check_against_one_process([r[stage] for r in reports], *one_process)


# -- in process: a world of one ------------------------------------------------------------------------------
@pytest.fixture
def world_of_one():
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def test_fsdp1_is_refused_in_both_orders(world_of_one):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with pytest.raises(PreparationError, match="fully_shard"):  # wrapped first
        loki.prepare(FSDP(tiny_model("llama"), device_id=torch.device("cpu")), loki.Selection.random(2, 32, q=10))
    model = prepared()
    with pytest.raises(ValueError, match="uniform `requires_grad`"):  # FSDP1's own refusal of mixed flags
        FSDP(model, device_id=torch.device("cpu"))
    wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
    ids = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(PreparationError, match="FSDP1"):
        wrapped(input_ids=ids)
    with pytest.raises(PreparationError, match="FSDP1"):
        loki.extract(wrapped)
    with pytest.raises(PreparationError, match="FSDP1"):
        loki.train(wrapped, None, DATA, progress=False)


def test_fsdp2_in_one_process_evaluates_and_extracts_exactly(world_of_one, one_process):
    from torch.distributed.fsdp import fully_shard

    model = prepared()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert loki.distributed.wrapper(model) == "fsdp2"
    check_against_one_process(
        [{"evals": hand_steps(model, torch_step), "rows": {str(k): v for k, v in rows(loki.extract(model)).items()}}],
        *one_process,
    )
    with pytest.raises(PreparationError, match="sharded"):
        loki.unprepare(model)
