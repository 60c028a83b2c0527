"""Section ``multi`` of bench_lora.py: many adapters in one batch (``automodel_lora.adapter_batch``) on the 4-layer
Llama-8B-shaped model, bf16, r = 16 on all 7 projections, interleaved in one run, ratio to the base model:

  prefill   8 sequences x 1024 tokens, forward only, with 1, 4 and 8 distinct adapters (``prefill_k``)
  decode    64 sequences, one token each, forward only, with 1 and 64 distinct adapters (``decode_k``: the gather
            kernel, ``kernels/gather_mm.py``; ``decode_k_segmented``: the segmented kernel prefill uses)
  train     fwd + bwd of 8 x 1024 tokens with 4 adapters (two sequences each, grouped), against the same
            step with one adapter through the single-adapter path (``train_single``) and the base model;
            ``train_4_graphed`` (CUDA only): ``train_4`` replayed as a CUDA graph (``GraphedStep``)
  graphed   (CUDA only) ``decode_base_graphed`` / ``decode_64_graphed``: the decode forwards captured once as a
            CUDA graph and replayed (what a serving loop does with a fixed batch), ratio to the eager base; their
            logits checked against the eager forward's
Beside them: ``prefill_merged`` / ``decode_merged`` (one adapter merged into the weights: the base model's cost
with one adapter's effect) and, where PEFT is installed, ``peft_prefill_8`` / ``peft_decode_64`` (HF PEFT's
mixed-adapter inference, ``adapter_names=`` in forward, the same adapters copied in). Every mixed arm's logits
on the batch are checked against the sequences run one adapter at a time (``set_adapter``; PEFT's against
ours) before timing. Peak memory beside each.
"""

from __future__ import annotations

import contextlib
import copy

import bench_model
import bench_model_shapes
import torch
from bench_common import DEV, fmt, interleaved, kernel_profile, md_table, peak_delta_mib

import automodel_lora as al

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, N_ADAPTERS = 16, 64
PREFILL, DECODE = (8, 1024), (64, 1)
LOGITS_RTOL = 2**-5  # bf16 logits of two orders of the same sums


def build(smoke: bool):
    """(the 8b-shaped model with N_ADAPTERS named adapters a0..a63 (B nonzero), the same base without adapters,
    both in eval mode; the config)."""
    shape = bench_model_shapes.select(["8b"], smoke)[0]
    cfg, cls, _ = shape.build()
    torch.manual_seed(0)
    with torch.device(DEV):
        base = cls(cfg)
    base = base.to(torch.bfloat16 if DEV == "cuda" else torch.float32).requires_grad_(False).eval()
    model = copy.deepcopy(base)
    for k in range(2 if smoke else N_ADAPTERS):
        al.apply_lora_to_linear_modules(model, al.PeftConfig(target_modules=PROJ, dim=R, alpha=2 * R),
                                        adapter_name=f"a{k}")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return model.eval(), base, cfg


def _names(model, k: int, n: int) -> list[str]:
    """``n`` sequences over ``k`` distinct adapters, grouped (a0 a0 a1 a1 ...)."""
    names = al.adapter_names(model)
    return [names[i * k // n] for i in range(n)]


@torch.no_grad()
def check(model, ids, names, decode_kernel: str = "gather") -> float:
    """max |mixed - one at a time| / max |logit| of the batch."""
    with al.adapter_batch(model, names, decode_kernel=decode_kernel):
        mixed = model(input_ids=ids).logits.float()
    worst = 0.0
    for i, name in enumerate(names):
        al.set_adapter(model, name)
        alone = model(input_ids=ids[i : i + 1]).logits[0].float()
        worst = max(worst, ((mixed[i] - alone).abs().max() / alone.abs().max()).item())
    al.set_adapter(model, "a0")
    return worst


def _forward_arm(model, ids, names, contexts: contextlib.ExitStack, decode_kernel: str = "gather"):
    """Forward of a copy of ``model`` inside an ``adapter_batch`` entered once (the stacks built outside the
    timing, as in generation, where one block serves every decode step), decode on ``decode_kernel``."""
    own = copy.deepcopy(model)
    contexts.enter_context(al.adapter_batch(own, names, decode_kernel=decode_kernel))

    def step(i):
        with torch.no_grad():
            own(input_ids=ids)
    return step


def _graphed_forward_arm(model, ids, names, contexts: contextlib.ExitStack):
    """(the step, its logits' max relative difference from the eager forward's): a forward of a copy of ``model``
    (inside an ``adapter_batch`` block open for the run when ``names``) on fixed ``ids``, captured once as a CUDA
    graph after three eager calls (Triton's autotuning, the block's stacks), then replayed; SDPA's causal path
    inside the capture as in the eager call (``causal_sdpa``)."""
    own = copy.deepcopy(model)
    if names:
        contexts.enter_context(al.adapter_batch(own, names))
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), al.causal_sdpa(own):
        for _ in range(3):
            eager = own(input_ids=ids).logits.float()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            replayed = own(input_ids=ids).logits
    graph.replay()
    diff = ((replayed.float() - eager).abs().max() / eager.abs().max()).item()
    return (lambda i: graph.replay()), diff


def _base_arm(base, ids, grad: bool):
    """The model without adapters (a copy never patched: no adapter machinery on its path)."""
    def step(i):
        with torch.set_grad_enabled(grad):
            out = base(input_ids=ids, labels=ids if grad else None)
        if grad:
            out.loss.backward()
    return step


def arms(model, base, cfg, smoke: bool, contexts: contextlib.ExitStack) -> tuple[dict, dict, list, dict]:
    """({arm: step}, {arm: logits check}, the training copies, {arm: the call its peak memory is taken from, where
    that is not its step}) of the three protocols."""
    pre = (2, 16) if smoke else PREFILL
    dec = (4, 1) if smoke else DECODE
    g = torch.Generator(device=DEV).manual_seed(1)
    pre_ids = torch.randint(0, cfg.vocab_size, pre, device=DEV, generator=g)
    dec_ids = torch.randint(0, cfg.vocab_size, dec, device=DEV, generator=g)
    steps = {"prefill_base": _base_arm(base, pre_ids, False), "decode_base": _base_arm(base, dec_ids, False)}
    checks = {}
    for k in (1, 4, 8) if not smoke else (1, 2):
        names = _names(model, k, pre[0])
        steps[f"prefill_{k}"] = _forward_arm(model, pre_ids, names, contexts)
        checks[f"prefill_{k}"] = check(model, pre_ids, names)
    for k in (1, N_ADAPTERS) if not smoke else (1, 2):
        names = _names(model, k, dec[0])
        for kernel, arm in (("gather", f"decode_{k}"), ("segmented", f"decode_{k}_segmented")):
            steps[arm] = _forward_arm(model, dec_ids, names, contexts, kernel)
            checks[arm] = check(model, dec_ids, names, kernel)
    merged = copy.deepcopy(model)
    al.merge_lora(merged)  # a0, the adapter in use
    steps["prefill_merged"] = _base_arm(merged, pre_ids, False)
    steps["decode_merged"] = _base_arm(merged, dec_ids, False)
    for protocol, ids, k in (("prefill", pre_ids, 2 if smoke else 8), ("decode", dec_ids, 2 if smoke else N_ADAPTERS)):
        peft_step, diff = peft_arm(model, base, ids, _names(model, k, ids.shape[0]))
        if peft_step is not None:
            steps[f"peft_{protocol}_{k}"], checks[f"peft_{protocol}_{k}"] = peft_step, diff
    train, models = train_arms(model, base, pre_ids, smoke)
    steps.update(train)
    memory = {}
    if DEV == "cuda":
        many = 2 if smoke else N_ADAPTERS
        steps["decode_base_graphed"], checks["decode_base_graphed"] = _graphed_forward_arm(base, dec_ids, None, contexts)
        steps[f"decode_{many}_graphed"], checks[f"decode_{many}_graphed"] = _graphed_forward_arm(
            model, dec_ids, _names(model, many, dec[0]), contexts)
        # a replay allocates nothing: the eager forward's peak stands for it
        memory.update({f"{k}_graphed": steps[k] for k in ("decode_base", f"decode_{many}")})
        steps["train_4_graphed"], graphed_model = graphed_train_arm(models[0], pre_ids, 2 if smoke else 4, contexts)
        memory["train_4_graphed"] = graphed_memory_step(graphed_model, pre_ids)
        models.append(graphed_model)
    return steps, checks, [*models, merged], memory


def peft_arm(model, base, ids, names: list):
    """(HF PEFT's mixed-batch forward with ``names``' adapters copied from ``model``, its logits' max relative
    difference from ours), or (None, None) where PEFT is not installed or refuses."""
    try:
        import peft
    except ImportError:
        return None, None
    from automodel_lora.adapter_slots import holder_of

    distinct = list(dict.fromkeys(names))
    cfg = peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=PROJ)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=distinct[0], autocast_adapter_dtype=False)
    for name in distinct[1:]:
        theirs.add_adapter(name, cfg)
    inner = theirs.base_model.model
    with torch.no_grad():
        for fqn, m in al.lora_modules(model):
            for name in distinct:
                target = inner.get_submodule(fqn)
                target.lora_A[name].weight.copy_(holder_of(m, name).lora_A.weight)
                target.lora_B[name].weight.copy_(holder_of(m, name).lora_B.weight)
    theirs.eval()
    with torch.no_grad(), al.adapter_batch(model, names):
        ours = model(input_ids=ids).logits.float()
        got = theirs(input_ids=ids, adapter_names=names).logits.float()
    diff = ((got - ours).abs().max() / ours.abs().max()).item()

    def step(i):
        with torch.no_grad():
            theirs(input_ids=ids, adapter_names=names)
    return step, diff


def train_arms(model, base, ids, smoke: bool) -> tuple[dict, list]:
    """({arm: step} of the training protocol: 4 adapters in one batch, one adapter alone, the base model
    (fwd + bwd; its embedding output requires grad so backward runs through every layer), the models)."""
    trained = copy.deepcopy(model).train()
    names = _names(trained, 2 if smoke else 4, ids.shape[0])

    def mixed(i):
        with al.adapter_batch(trained, names):
            trained(input_ids=ids, labels=ids).loss.backward()

    def single(i):
        trained(input_ids=ids, labels=ids).loss.backward()

    frozen = copy.deepcopy(base).train()
    frozen.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))  # backward
    return {"train_4": mixed, "train_single": single, "train_base": _base_arm(frozen, ids, True)}, [trained, frozen]


def graphed_train_arm(trained, ids, k: int, contexts: contextlib.ExitStack):
    """(``train_4``'s step replayed as a CUDA graph, its model): a copy of the trained model in one ``adapter_batch``
    block entered for the whole run, so the row ids and offsets the graph reads are made once, before the capture,
    and live as long as it; the step is the model section's graphed step (``bench_model.graphed_step``)."""
    own = copy.deepcopy(trained)
    contexts.enter_context(al.adapter_batch(own, _names(own, k, ids.shape[0])))
    step = bench_model.graphed_step(own)  # after the block: its adapters are the trainable parameters
    return (lambda i: step(ids)), own


def graphed_memory_step(model, ids):
    """The call whose peak ``peak_delta_mib`` measures for a graphed arm: a replay allocates nothing (its tensors
    live in the graph's pool since the capture), so a fresh step's warm-up calls and capture, on ``model`` as
    ``graphed_train_arm`` left it (the capture allocates, in its pool, what the eager step allocates)."""
    def call(i):
        fresh = bench_model.graphed_step(model)
        for _ in range(bench_model.GRAPH_WARMUP + 1):
            fresh(ids)
    return call


def run(args) -> dict:
    """{"multi": one row per arm}."""
    model, base, cfg = build(args.smoke)
    with contextlib.ExitStack() as contexts:
        steps, checks, copies, memory = arms(model, base, cfg, args.smoke, contexts)
        params = [p for m in (model, base, *copies) for p in m.parameters()]

        def prep(i):
            for p in params:
                p.grad = None

        times = interleaved(steps, n=args.n, rounds=args.rounds, warmup=args.warmup, prep=prep)
        profiles = {k: kernel_profile(steps[k], prep=prep) for k in args.profile if k in steps}
        mem = {k: peak_delta_mib(memory.get(k, s), prep) for k, s in steps.items()}
    rows = []
    for k, ms in times.items():
        protocol = k.removeprefix("peft_").split("_")[0]
        ref = times.get(f"{protocol}_base")
        rows.append(dict(variant=k, protocol=protocol, ms=ms, ratio=ms / ref if ref else None, peak_mib=mem[k],
                         logits_rel_diff=checks.get(k), logits_ok=None if k not in checks else checks[k] <= LOGITS_RTOL))
        if k.startswith("train_4"):  # the goal for training is against our single-adapter step
            rows[-1]["ratio_to_single"] = ms / times["train_single"]
        print(f"[multi] {k}: {ms:.3f} ms" + (f", {ms / ref:.3f}x of base" if ref else ""), flush=True)
    for k, text in profiles.items():
        print(f"[multi] profile of {k}:\n{text}", flush=True)
    return {"multi": rows, **({"multi_profile": profiles} if profiles else {})}


def table(results: dict) -> list[str]:
    if not results.get("multi"):
        return []
    rows = [[r["variant"], f"{r['ms']:.3f}", fmt(r["ratio"], ".3f") + ("x" if r["ratio"] else ""),
             f"{r['peak_mib']:.0f}",
             fmt(r["logits_rel_diff"], ".2e") + ("" if r["logits_ok"] in (None, True) else " (DISAGREES)")]
            for r in results["multi"]]
    return md_table("Many adapters in one batch: 8b-shaped model, bf16, r=16 on 7 projections, ratio to the base model",
                    ["arm", "ms", "ratio to base", "peak MiB", "logits vs one at a time"], rows)
