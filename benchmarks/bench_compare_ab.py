"""A/B of the training step of ``tucker-peft compare``'s default task between two (or more) code trees.

Each tree gets a worker process (``sys.path[0]`` = that tree) that builds the
shape of the default ``minilm`` task's tail: two MiniLM-sized BERT layers
(hidden 384, 12 heads, FFN 1536; random weights, nothing is downloaded), mean
pooling and a linear head, with every attention/MLP Linear adapted at
``lora:4`` like the default command. The parent then asks the workers for a
few training steps each (AdamW, gradient clipping at 5: the runner's step), one
tree after the other in a shuffled order, per kind and round, so that a change
in machine load hits every tree alike. Only one worker runs at a time.

Reported per kind: each tree's median step time and the median over rounds of
the paired ratio ``tree / first tree`` (below 1: faster than the first tree).
The same table follows for CPU time (robust to waiting on a busy machine,
blind to thread stalls).

Usage::

    git worktree add /tmp/oldmain <commit>          # the tree to compare against
    python benchmarks/bench_compare_ab.py /tmp/oldmain .            # 15 rounds, 1 thread
    python benchmarks/bench_compare_ab.py /tmp/oldmain . --threads 2 --rounds 30 --kinds lora,cp

A worker only needs ``tucker_peft.backends.torch.inject`` and ``AdapterConfig``
(kind, budget, target_modules, trainable, init, seed), so trees from before
``tucker_peft.compare`` existed work too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

KINDS = ("tucker", "tucker2", "cp", "lora")
TARGETS = (r"layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
           r"intermediate\.dense|output\.dense)")
# Token counts of the VADER words under the MiniLM tokenizer (with [CLS] and [SEP]), 7,520 words.
LENGTHS = {3: 2244, 4: 3171, 5: 1516, 6: 511, 7: 62, 8: 8, 9: 6, 11: 2}


# -- worker ------------------------------------------------------------------------------------

def _worker(tree: str, threads: int, batch: int) -> None:
    sys.path.insert(0, os.path.abspath(tree))
    import copy

    import torch
    from torch import nn
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    from tucker_peft.backends.torch import AdapterConfig, inject

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    cfg = BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layers = [BertLayer(cfg).eval() for _ in range(2)]

    class Tail(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleDict({str(4 + i): l for i, l in enumerate(layers)})
            for p in self.layer.parameters():
                p.requires_grad_(False)
            self.head = nn.Linear(384, 1)

        def forward(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            ext = (1.0 - m[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            for layer in self.layer.values():
                o = layer(h, attention_mask=ext)
                h = o[0] if isinstance(o, tuple) else o
            w = m[..., None].to(h.dtype)
            return self.head((h * w).sum(1) / w.sum(1).clamp_min(1.0)).squeeze(-1)

    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([n for n, c in LENGTHS.items() for _ in range(c)])
    base = Tail().eval()
    models: dict[str, tuple] = {}

    def setup(kind: str) -> tuple:
        model = copy.deepcopy(base)
        inject(model, AdapterConfig(kind=kind, budget="lora:4", target_modules=TARGETS,
                                    trainable=r"head\.(weight|bias)", init="zero", seed=0))
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
        return model, trainable, opt

    def batch_data() -> tuple:
        ln = lengths[torch.randint(0, len(lengths), (batch,), generator=g)]
        n = int(ln.max())
        m = (torch.arange(n)[None, :] < ln[:, None]).long()
        return torch.randn(batch, n, 384, generator=g), m, torch.randn(batch, generator=g)

    def step(kind: str, data: tuple) -> None:
        model, trainable, opt = models[kind]
        h, m, t = data
        loss = ((model(h, m) - t) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 5.0)
        opt.step()
        float(loss.detach())

    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        kind = req["kind"]
        if kind not in models:
            models[kind] = setup(kind)
            step(kind, batch_data())  # warm-up
        datas = [batch_data() for _ in range(req["steps"])]
        c0, t0 = time.process_time(), time.perf_counter()
        for d in datas:
            step(kind, d)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"wall": wall / req["steps"], "cpu": cpu / req["steps"]}), file=out, flush=True)


# -- parent ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trees", nargs="*", help="code trees (repository roots); ratios are to the first")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10, help="steps per measurement")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        _worker(a.worker, a.threads, a.batch)
        return 0
    if len(a.trees) < 2:
        ap.error("expected at least two code trees to compare")
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    env.pop("PYTHONPATH", None)  # the worker's tree comes first on sys.path, nothing else of ours
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and "tucker" not in p
             and os.path.abspath(p) not in {os.path.abspath(t) for t in a.trees}]
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(extra)
    workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", t, "--threads",
                                 str(a.threads), "--batch", str(a.batch)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
               for t in a.trees]
    for w in workers:
        json.loads(w.stdout.readline())
    rng = random.Random(0)
    samples = {k: [[] for _ in a.trees] for k in kinds}
    try:
        for r in range(a.rounds):
            for k in kinds:
                order = list(range(len(a.trees)))
                rng.shuffle(order)
                for i in order:
                    workers[i].stdin.write(json.dumps({"kind": k, "steps": a.steps}) + "\n")
                    workers[i].stdin.flush()
                    samples[k][i].append(json.loads(workers[i].stdout.readline()))
    finally:
        for w in workers:
            w.stdin.close()
            w.wait()
    names = [os.path.basename(os.path.abspath(t)) or t for t in a.trees]
    for key in ("wall", "cpu"):
        print(f"step time ({key}), {a.threads} thread(s), batch {a.batch}, {a.rounds} rounds x {a.steps} steps; "
              f"ratio = median over rounds of tree / {names[0]}")
        head = ["kind"] + [f"{n} ms" for n in names] + [f"{n}/{names[0]}" for n in names[1:]]
        rows = []
        for k in kinds:
            med = [statistics.median(s[key] for s in samples[k][i]) * 1e3 for i in range(len(a.trees))]
            rat = [statistics.median(x[key] / y[key] for x, y in zip(samples[k][i], samples[k][0]))
                   for i in range(1, len(a.trees))]
            rows.append([k] + [f"{m:.1f}" for m in med] + [f"{x:.3f}" for x in rat])
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
        for row in [head] + rows:
            print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
