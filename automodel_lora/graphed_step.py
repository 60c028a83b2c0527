"""Forward and backward of a training step replayed as one CUDA graph per input shape.

A LoRA step of a small model is host-bound: every adapted linear costs the host a few hundred
microseconds (Python, autograd, launches) while its GEMMs take tens on the GPU, so the GPU waits.
A CUDA graph records every kernel of forward and backward once and replays them with one launch::

    step = GraphedStep(lambda ids, labels: model(input_ids=ids, labels=labels).loss, trainable_params)
    for ids, labels in batches:
        loss = step(ids, labels)        # forward + backward; gradients accumulate into p.grad
        optimizer.step()
        optimizer.zero_grad()           # set_to_none or not: the step restores its gradient buffers

``fn(*inputs)`` returns the objective to differentiate, or a tuple ``(objective, *reported)``; the
step returns detached copies of the reported tensors (of the objective when none). The first
``warmup`` calls of each input signature (shapes, dtypes, devices) run eagerly on a side stream
(Triton autotuning, lazy caches and allocations happen there), the next one captures the graph,
and every later call replays it.

Invariants the replay relies on, kept by this class:

- the inputs are copied into static buffers of the graph (the caller's tensors may live anywhere);
- every trainable parameter has a ``.grad`` before the capture, so autograd's accumulation is an
  in-place add into that tensor: a replay accumulates exactly as an eager backward does, across
  micro-batches too; a ``.grad`` set to None or replaced between calls is put back (zeroed, or
  holding the replacement's values) before the next replay;
- random numbers drawn on the device (dropout seeds) advance per replay (PyTorch registers the
  default CUDA generator with the graph).

What a graph cannot follow, and the caller must not change after the capture: host-side
control flow that depends on the data (``.item()`` and other synchronizations fail the capture
instead), the set of trainable parameters, autocast or grad-mode settings inside ``fn``, and the
parameters' storage (``.data =`` replacements; in-place updates such as an optimizer's are fine).
A capture that fails (a synchronization inside ``fn``, an unsupported op) raises
:class:`GraphCaptureError` naming the cause, or with ``fallback=True`` leaves that signature on the
eager path and records the reason in :attr:`eager_reasons`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

__all__ = ["GraphedStep", "GraphCaptureError"]


class GraphCaptureError(RuntimeError):
    """A training step could not be captured as a CUDA graph (the message names the cause)."""


class _Graph:
    """One captured signature: the graph, its static inputs and outputs, and the parameters its backward does
    not reach (their ``.grad`` is None after a replay, as after an eager backward)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list, outputs: tuple, unreached: list):
        self.graph, self.inputs, self.outputs, self.unreached = graph, inputs, outputs, unreached


class GraphedStep:
    """``fn``'s forward and backward, replayed as a CUDA graph per input signature.

    Args:
        fn: ``fn(*inputs) -> objective`` or ``-> (objective, *reported)``; ``objective`` is a
            scalar tensor whose ``backward()`` gives the gradients.
        params: The trainable parameters (those whose ``.grad`` the step accumulates).
        warmup: Eager calls of each signature before its capture (>= 1: the first call of a
            signature runs Triton's autotuning and fills lazy caches, which a capture must not do).
        max_graphs: Signatures captured at most; later new signatures run eagerly (each graph
            keeps its kernel parameters; the activations share one memory pool).
        fallback: A failed capture leaves its signature on the eager path (reason in
            :attr:`eager_reasons`) instead of raising :class:`GraphCaptureError`.

    Raises:
        ValueError: ``warmup`` < 1, ``max_graphs`` < 1, or a parameter not requiring grad.
    """

    def __init__(self, fn: Callable, params: Sequence[torch.nn.Parameter], *, warmup: int = 2,
                 max_graphs: int = 8, fallback: bool = False):
        if warmup < 1:
            raise ValueError(f"GraphedStep: warmup must be >= 1 (eager calls before the capture), got {warmup}")
        if max_graphs < 1:
            raise ValueError(f"GraphedStep: max_graphs must be >= 1, got {max_graphs}")
        self.params = list(params)
        frozen = [i for i, p in enumerate(self.params) if not p.requires_grad]
        if frozen:
            raise ValueError(f"GraphedStep: params[{frozen[0]}] does not require grad; pass only the trainable "
                             "parameters (e.g. [p for p in model.parameters() if p.requires_grad])")
        self.fn, self.warmup, self.max_graphs, self.fallback = fn, warmup, max_graphs, fallback
        self.graphs: dict[tuple, _Graph] = {}
        self.eager_reasons: dict[tuple, str] = {}  # signature -> why it runs eagerly for good
        self._calls: dict[tuple, int] = {}
        self._grads: list[torch.Tensor] | None = None  # the .grad tensors the graphs accumulate into
        self._pool = None
        self._reached: set = set()  # ids of the params the objective reaches (found at a capture)

    # ---------------------------------------------------------------- calls
    def __call__(self, *inputs: torch.Tensor):
        """One forward and backward of ``fn(*inputs)``: the reported tensors, detached copies.

        Raises:
            TypeError: an input that is not a tensor.
            GraphCaptureError: the capture of a new signature failed (and ``fallback`` is off).
        """
        key = self._signature(inputs)
        graph = self.graphs.get(key)
        if graph is not None:
            return self._replay(graph, inputs)
        n = self._calls[key] = self._calls.get(key, 0) + 1
        if key in self.eager_reasons or n <= self.warmup:
            return self._eager(inputs, side_stream=n <= self.warmup and key not in self.eager_reasons)
        if len(self.graphs) >= self.max_graphs:
            self.eager_reasons[key] = f"max_graphs={self.max_graphs} signatures are captured already"
            return self._eager(inputs, side_stream=False)
        graph = self._capture(key, inputs)
        if graph is None:
            return self._eager(inputs, side_stream=False)
        return self._replay(graph, inputs)

    @staticmethod
    def _signature(inputs) -> tuple:
        bad = [i for i, t in enumerate(inputs) if not isinstance(t, torch.Tensor)]
        if bad:
            raise TypeError(f"GraphedStep: input {bad[0]} is a {type(inputs[bad[0]]).__name__}, not a tensor; "
                            "pass numbers as 0-dim tensors (a Python number would be frozen into the graph)")
        return tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)

    def _run(self, inputs, check_leaves: bool = False) -> tuple:
        """fn, backward of the objective; the reported tensors (detached). ``check_leaves`` (at a capture):
        every trainable leaf the objective reaches must be one of ``params`` (see :meth:`_check_leaves`)."""
        out = self.fn(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        if check_leaves:
            self._check_leaves(out[0])
        out[0].backward()
        return tuple(t.detach() for t in (out[1:] or out[:1]))

    def _check_leaves(self, objective: torch.Tensor) -> None:
        """A trainable parameter outside ``params`` would get its ``.grad`` from the graph's pool, overwritten (not
        accumulated) on every replay: refuse it. Records the ``params`` the objective reaches (``_reached``).
        Leaves inside reentrant activation checkpointing are not in the forward graph and go unseen: the recipe
        checkpoints non-reentrantly.

        Raises:
            ValueError: naming how many such leaves and the shape of the first.
        """
        known, missing, seen = {id(p) for p in self.params}, [], set()
        stack = [objective.grad_fn]
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            leaf = getattr(fn, "variable", None)  # an AccumulateGrad node
            # Only parameters: a tensor the step itself made a leaf (``enable_input_require_grads``'s embedding
            # output, for checkpointing) is born and dropped inside each replay, and so is its ``.grad``.
            if isinstance(leaf, nn.Parameter) and leaf.requires_grad and id(leaf) not in known:
                missing.append(leaf)
            elif leaf is not None:
                self._reached.add(id(leaf))
            stack.extend(f for f, _ in fn.next_functions)
        if missing:
            raise ValueError(f"GraphedStep: {len(missing)} trainable tensor(s) the step differentiates are not in "
                             f"params (the first of shape {tuple(missing[0].shape)}); pass every parameter that "
                             "requires grad: [p for p in model.parameters() if p.requires_grad]")

    def _eager(self, inputs, side_stream: bool):
        if not side_stream or not torch.cuda.is_available() or not any(t.is_cuda for t in inputs):
            return _unpack(self._run(inputs))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = self._run(inputs)
        torch.cuda.current_stream().wait_stream(stream)
        return _unpack(out)

    def _replay(self, graph: _Graph, inputs):
        self._restore_grads()
        for static, x in zip(graph.inputs, inputs, strict=True):
            static.copy_(x, non_blocking=True)
        graph.graph.replay()
        for p in graph.unreached:  # an optimizer skips a None grad; a zero one would still decay and move it
            p.grad = None
        return _unpack(tuple(t.clone() for t in graph.outputs))

    # ---------------------------------------------------------------- capture
    def _capture(self, key: tuple, inputs) -> _Graph | None:
        """Capture ``key``'s graph (None, with the reason recorded, where it failed and ``fallback`` is on).

        The capture runs on a side stream entered with ``with``, so the caller's stream is current again
        whatever the capture raised; a failed capture's memory pool is dropped (a later capture starts a
        fresh one rather than one left mid-recording)."""
        if not all(t.is_cuda for t in inputs):
            return self._failed(key, "an input is not on a CUDA device (CUDA graphs replay CUDA kernels only)")
        self._own_grads()
        static = [t.detach().clone() for t in inputs]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, stream, error, outputs = torch.cuda.CUDAGraph(), torch.cuda.Stream(), None, None
        self._reached = set()
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
        clean_rng = generator.clone_state()  # the generator's state before the capture registers it
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=self._pool)
            try:
                outputs = self._run(static, check_leaves=True)
            except Exception as e:  # any op that a capture cannot record: the signature stays eager
                error = e
            finally:
                try:
                    graph.capture_end()
                except Exception as e:  # an invalidated capture fails here too: keep the first cause
                    error = error or e
        torch.cuda.current_stream().wait_stream(stream)
        if error is not None:
            torch.cuda.synchronize()
            # An invalidated capture never ends the generator's capture: its state would refuse every later draw
            # ("Offset increment outside graph capture"). Put back the state from before the capture.
            generator.graphsafe_set_state(clean_rng)
            self._pool = None
            if isinstance(error, ValueError) and "GraphedStep:" in str(error):
                raise error  # a misuse (parameters missing from params), not a capture limit
            return self._failed(key, f"{type(error).__name__}: {error}".strip())
        self.graphs[key] = _Graph(graph, static, outputs, [p for p in self.params if id(p) not in self._reached])
        return self.graphs[key]

    def _failed(self, key: tuple, reason: str) -> None:
        if not self.fallback:
            raise GraphCaptureError(
                f"GraphedStep: the step for inputs {[s for s, _, _ in key]} could not be captured as a CUDA graph: "
                f"{reason}. Remove host synchronizations (.item(), .tolist(), data-dependent shapes) from the step, "
                "or run it eagerly (train.cuda_graphs=false in the recipe)")
        self.eager_reasons[key] = reason
        return None

    # ---------------------------------------------------------------- gradients
    def _own_grads(self) -> None:
        """Give every parameter a ``.grad`` (zeros where it had none) and keep them: the graphs add into these."""
        if self._grads is not None:
            self._restore_grads()
            return
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._grads = [p.grad for p in self.params]

    def _restore_grads(self) -> None:
        """Put the captured ``.grad`` tensors back where a caller set them to None (zeroed) or replaced them."""
        if self._grads is None:
            return
        zero = []
        for p, g in zip(self.params, self._grads, strict=True):
            if p.grad is g:
                continue
            if p.grad is None:
                zero.append(g)
            else:
                g.copy_(p.grad)
            p.grad = g
        if zero:
            torch._foreach_zero_(zero)

    def zero_grad(self) -> None:
        """Zero the gradients in place (the buffers the graphs accumulate into stay the same)."""
        self._restore_grads()
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)


def _unpack(out: tuple):
    return out[0] if len(out) == 1 else out
