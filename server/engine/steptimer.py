"""Where a serving step's wall time goes, on the host clock: a few perf_counter() calls per model step.

A step is timed from the end of the previous model step to its own end, in consecutive phases:

- loop: the engine thread between two steps (handing outputs to the event loop, running queued commands
  such as new requests, aborts and admin calls, the back-off sleep after a step with no output, the launch
  pacer's wait for the device to need the next step: server/engine/pacer.py). Counted
  only while work was left after the previous step; 0 after an idle spell or a step that ran no model.
- schedule: adapter-load polls, the scheduler (admission, KV blocks, adapter slots, preemption).
- prepare: per-request set-up (seeded streams, grammar matchers), the flattened host lists, and the
  device metadata (the CUDA graph's static buffers, or the eager batch's tensors).
- launch: from the forward call (graph replay or eager forward) to the step's host sync, including the
  sampler's logits processors and grammar masks issued behind it, and the adapter copies reserved by this
  step's admissions (adapters/cache.py). Asynchronous on CUDA, so it overlaps the GPU; on the CPU the
  forward itself runs here.
- device_wait: the step's one host sync (the sampled ids coming back): on CUDA, the GPU time of the step
  that the host did not cover.
- sample: the rest of sampling on the host (seeded draws, logprobs).
- postprocess: appending tokens, stop checks, incremental detokenization, building the outputs.

Without asynchronous scheduling the GPU idles for about loop + schedule + prepare + sample + postprocess of
each step. With it (LLMEngine.step, the default on CUDA) a model step launches while the previous one still
runs: device_wait, sample and postprocess then belong to that previous step, every host phase overlaps the
device, and only device_wait is time the host spent waiting for it. The histograms are exported on /metrics as
hotlora_step_phase_seconds{phase} and hotlora_step_tokens.
"""

from __future__ import annotations

import time

from hotlora.adapters.loadstats import Histogram

PHASES = ("loop", "schedule", "prepare", "launch", "device_wait", "sample", "postprocess")
PHASE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                 0.5, 1.0, 2.5)  # fmt: skip
TOKEN_BUCKETS = tuple(float(1 << k) for k in range(14))  # 1 .. 8192 tokens per step


class StepTimer:
    """The engine fills it once per step: begin(), mark(phase) as each phase ends, then finish() for a
    step that ran the model or skip() for one that did not. Single-threaded (the engine thread); the
    histograms may be read from another thread."""

    def __init__(self) -> None:
        self.phases = {p: Histogram(PHASE_BUCKETS) for p in PHASES}
        self.tokens = Histogram(TOKEN_BUCKETS)
        self.last: dict[str, float] = {}  # the latest finished step's seconds by phase
        self.began = 0.0  # perf_counter() at the current step's begin()
        self.at: dict[str, float] = {}  # perf_counter() at the latest end of each phase (the launch pacer's clock)
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._t = 0.0
        self._end: float | None = None  # when the previous model step ended, while work was left

    def begin(self) -> None:
        now = time.perf_counter()
        self._seconds = dict.fromkeys(PHASES, 0.0)
        self._seconds["loop"] = 0.0 if self._end is None else now - self._end
        self._t = self.began = now

    def mark(self, phase: str) -> None:
        """The time since the previous mark (or begin) goes to phase."""
        now = time.perf_counter()
        self._seconds[phase] += now - self._t
        self._t = self.at[phase] = now

    def finish(self, tokens: int, busy: bool) -> None:
        """Record the step (tokens: scheduled this step; busy: work is left, so the next step's loop
        phase counts)."""
        for phase, seconds in self._seconds.items():
            self.phases[phase].observe(seconds)
        self.tokens.observe(tokens)
        self.last = self._seconds
        self._end = self._t if busy else None

    def skip(self) -> None:
        """A step that ran no model (every waiting request held up): recorded nowhere, and the next
        step's loop phase starts from 0."""
        self._end = None
