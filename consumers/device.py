"""The device stage: runs the first layers the policy asks for, exits or offloads, applies feedback.

It consumes ``samples`` and ``feedback``. Samples are decided in batches through the shared decision
loop (:func:`policies.engine.run_device`) with the real model as the layer runner; an offloaded sample
carries its hidden state at the split layer (trimmed to its real length; int8 per token by default,
float16 with ``hidden_encoding="f16"``, see :mod:`stream.messages`), or its raw text when nothing ran
here. Feedback records complete the delayed rewards of earlier offloads: they are learned by the policy
that made the decision (rebuilt from the spec carried in the record), even after a swap.
"""

from __future__ import annotations

import collections
import json
import logging
import time

import numpy as np

from stream import messages
from stream.checkpoint import SampleCommit, awaiting, encode_updates, resolved
from stream.errors import ConfigError, MessageError

from consumers.records import result_record
from consumers.runner import ModelRunner
from consumers.worker import StageWorker, WorkerConfig, dlq_envelope, envelope, part_key, reason_kind
from monitoring.drift import HookDetector, HookSettings, reference_distance
from policies.base import Exit, Feedback, Observation, Policy, StateView, split_namespace
from policies.control import ActiveSpec, PolicyControl
from policies.engine import feedback_event, new_epoch, run_device
from policies.state import epoch_events

log = logging.getLogger(__name__)


#: An offloaded pull whose feedback has not come for this long is expired (its pending count undone once):
#: the feedback was lost, e.g. with a broker that restarted empty. Far above any cloud backlog measured here.
PENDING_TIMEOUT_S = 600.0
#: How often a device worker looks for such pulls.
SWEEP_EVERY_S = 30.0


class DeviceWorker(StageWorker):
    stage = "device"

    def __init__(self, config: WorkerConfig, model, default_policy: ActiveSpec, max_len: int = 128,
                 metrics=None, reference: np.ndarray | None = None,
                 hidden_encoding: str = messages.DEFAULT_HIDDEN_ENCODING,
                 drift_hook: HookSettings | None = None, pending_timeout_s: float = PENDING_TIMEOUT_S) -> None:
        super().__init__(config, metrics)
        if pending_timeout_s < 0:
            raise ConfigError(f"device worker: pending timeout must be >= 0 seconds (0: never expire), got "
                              f"{pending_timeout_s!r}")
        self.pending_timeout_s = float(pending_timeout_s)
        self._swept_at = time.monotonic()
        if hidden_encoding not in messages.HIDDEN_ENCODINGS:
            raise ConfigError(f"device worker: hidden encoding must be one of {sorted(messages.HIDDEN_ENCODINGS)}, "
                              f"got {hidden_encoding!r}")
        self.hidden_encoding = hidden_encoding
        self.model = model
        self.reference = reference  # per-class centroids of in-domain input embeddings, for the drift signal
        if reference is not None and reference.shape[-1] != model.hidden_size:
            raise ConfigError(f"reference centroids have dimension {reference.shape[-1]}, the model's input "
                              f"embedding has {model.hidden_size}: export the reference matrix with this model")
        self.max_len = max_len
        self.control = PolicyControl(self.redis, config.redis_prefix)
        self.spec = self.control.ensure(default_policy, model.num_layers, model.num_classes)
        self.policy = self.spec.build(model.num_layers, model.num_classes)
        self._seen_version = self.spec.version
        self._feedback_policies: dict[str, Policy] = {}
        self._hook_default = drift_hook or HookSettings()   # used while the deployment sets none
        self._hook_raw: str | None = None
        self.hook = HookDetector(self._hook_default)
        self._proposed: collections.deque[str] = collections.deque(maxlen=64)  # epoch starts this worker sent
        self.policy.epoch = self.control.epoch(self.policy.base_namespace())
        self._announce()

    def inputs(self) -> list[str]:
        return [self.topics.samples, self.topics.feedback]

    # -- hot swap and epochs at the batch boundary ---------------------------------------------------
    def _refresh(self) -> None:
        """One round trip per batch: a new active version, a new epoch of its state, new hook settings."""
        version, epoch, hook = self.control.watch(self.policy.base_namespace())
        if version != self._seen_version:
            self._refresh_policy(version)
            epoch = self.control.epoch(self.policy.base_namespace())
        if hook != self._hook_raw:
            self._hook_raw = hook
            try:
                settings = self._hook_default if hook is None else HookSettings.from_dict(json.loads(hook))
            except (ConfigError, ValueError) as exc:
                log.error("drift hook settings in Redis are invalid, keeping %s: %s", self.hook.settings.describe(), exc)
            else:
                log.info("drift hook: %s", settings.describe())
                self.hook = HookDetector(settings)
        if epoch != self.policy.epoch:
            self._epoch_moved(epoch)

    def _epoch_moved(self, epoch: int) -> None:
        """The active policy's state is in another epoch now (this worker's detection or another's)."""
        base = self.policy.base_namespace()
        events = {e.get("epoch"): e for e in epoch_events(self.redis, base, self.config.redis_prefix)}
        for k in range(self.policy.epoch + 1, epoch + 1):
            event = events.get(k, {})
            mine = event.get("at") in self._proposed
            log.info("policy %s: epoch %d began at sample %s (%s, %s%s)", self.spec.name, k, event.get("at"),
                     event.get("reason"), event.get("mode"), ", this worker" if mine else "")
            if mine and self.metrics:
                self.metrics.epoch(self.spec.name, str(event.get("reason", "drift")).split(":")[0])
        self.policy.epoch = epoch
        self.hook.restart()
        self._announce()

    def _refresh_policy(self, version: int) -> None:
        self._seen_version = version
        spec = self.control.current()
        try:
            policy = spec.build(self.model.num_layers, self.model.num_classes)
        except ConfigError as exc:
            log.error("policy %s v%d cannot be built here, %s v%d keeps serving: %s", spec.name, spec.version,
                      self.spec.name, self.spec.version, exc)
            return
        log.info("policy swap: %s v%d -> %s v%d", self.spec.name, self.spec.version, spec.name, spec.version)
        policy.epoch = self.control.epoch(policy.base_namespace())
        self.spec, self.policy = spec, policy
        self._announce()

    def _announce(self) -> None:
        if self.metrics:
            self.metrics.policy_info(self.spec.name, self.spec.version, self.policy.namespace())

    # -- a batch ---------------------------------------------------------------------------------
    def process(self, records: list) -> list[SampleCommit]:
        self._refresh()
        self._sweep()
        samples, feedback, commits = [], [], []
        for record in records:
            kind = "sample" if record.topic == self.topics.samples else "feedback"
            try:
                msg = messages.decode(kind, record.value, max_bytes=self.config.max_message_bytes,
                                      max_text=self.config.max_text_chars)
                if kind == "sample" and record.key is not None and record.key.decode("utf-8", "replace") != msg["id"]:
                    raise MessageError(f"sample key {record.key!r} differs from its id {msg['id']!r}")
            except MessageError as exc:
                commits.append(self._reject(record, str(exc)))
                continue
            (samples if kind == "sample" else feedback).append((record, msg))
        if samples:
            commits += self._decide(samples)
        if feedback:
            commits += self._learn_feedback(feedback)
        return commits

    def idle(self) -> None:
        self._sweep()           # a stream that stopped still gets its lost pulls expired

    def _sweep(self) -> None:
        """Expire the pulls that have awaited feedback past the pending timeout (at most every 30 s)."""
        if not self.pending_timeout_s or time.monotonic() - self._swept_at < SWEEP_EVERY_S:
            return
        self._swept_at = time.monotonic()
        expired = self.checkpoint.expire_pending(self.pending_timeout_s, time.time())
        for ns, n in expired.items():
            log.warning("device: %d pulls of %s awaited feedback for over %gs; expired (their pending counts "
                        "undone once; a feedback arriving later is a duplicate)", n, ns, self.pending_timeout_s)
            if self.metrics:
                self.metrics.pending_expired(n)

    def _reject(self, record, reason: str) -> SampleCommit:
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        log.warning("device: rejected %s to the DLQ: %s", where, reason)
        if self.metrics:
            self.metrics.dlq(reason_kind(reason))
        return SampleCommit(f"{where}", part_key(record), dedup="",
                            outputs=[dlq_envelope(self.topics, self.stage, record, reason)])

    def _decide(self, samples: list) -> list[SampleCommit]:
        import torch
        started = time.time()
        policy, ns = self.policy, self.policy.namespace()
        msgs = [m for _, m in samples]
        pairs = [m.get("text_pair") for m in msgs]
        with torch.inference_mode():
            batch = self.model.tokenize([m["text"] for m in msgs],
                                        pairs if any(p is not None for p in pairs) else None, self.max_len)
            embeddings = self.model.embed(batch).numpy()
            hidden, mask = self.model.start(batch)
            state = StateView(self.checkpoint.state(ns))
            observations = [Observation(m["id"], self.model.num_layers, embedding=embeddings[i])
                            for i, m in enumerate(msgs)]
            runner = ModelRunner(self.model, hidden, mask)
            outcomes = run_device(policy, state, observations, runner)
            lengths = mask.sum(1).tolist()
            final_hidden = runner.hidden
        distances = reference_distance(embeddings, self.reference)
        detected = self._detect(msgs, distances)
        elapsed_ms = (time.time() - started) * 1000.0
        commits = []
        policy_ref = {"name": self.spec.name, "version": self.spec.version, "ns": ns}
        for i, ((record, msg), outcome) in enumerate(zip(samples, outcomes)):
            if isinstance(outcome.action, Exit):
                record_ = result_record(msg, outcome.trace, policy.cost, outcome.probs, outcome.observation.layer,
                                        policy_ref, decision=outcome.observation, latency_device_ms=elapsed_ms,
                                        stage=self.stage, embedding_distance=distances[i], ts_device=started)
                out = envelope(self.topics.results, msg["id"], messages.encode("result", record_))
                if self.metrics:
                    self.metrics.result(record_)
            else:
                out = self._offload(msg, outcome, final_hidden[i, :int(lengths[i])], elapsed_ms, distances[i],
                                    started)
            updates = encode_updates(ns, outcome.delta)
            undo = policy.expiry(outcome.delta) if not isinstance(outcome.action, Exit) else {}
            if undo:
                updates.append(awaiting(ns, msg["id"], undo, started))
            if i == detected:
                updates.append(self._epoch_start(msg, state).update())
            commits.append(SampleCommit(msg["id"], part_key(record), dedup=f"device:{msg['id']}",
                                        updates=updates, outputs=[out], record=record))
        if self.metrics:
            self.metrics.latency(elapsed_ms / 1000.0)
        return commits

    # -- the drift hook ---------------------------------------------------------------------------
    def _detect(self, msgs: list[dict], distances: list[float | None]) -> int | None:
        """Feed the batch's distances to the detector in stream order; the position of the first detection."""
        if self.reference is None or not self.hook.settings.enabled:
            return None
        order = sorted(range(len(msgs)), key=lambda i: (msgs[i].get("seq") is None, msgs[i].get("seq") or 0))
        found = None
        for i in order:
            if self.hook.update(distances[i]) and found is None:
                found = i
        return found

    def _epoch_start(self, msg: dict, state: StateView):
        """The epoch start the detecting sample's commit carries (applied once, with the sample)."""
        settings = self.hook.settings
        self._proposed.append(msg["id"])
        log.info("drift hook: distance shift detected at sample %s (seq %s); starting epoch %d of %s (%s)",
                 msg["id"], msg.get("seq"), self.policy.epoch + 1, self.policy.base_namespace(), settings.mode)
        info = {"policy": self.spec.name, "version": self.spec.version, "at": msg["id"], "seq": msg.get("seq"),
                "source": msg.get("source"), "time": time.time(), "reason": f"drift:distance/{settings.kind}",
                "mode": settings.mode, "factor": settings.factor if settings.mode == "decay" else None}
        return new_epoch(self.policy, state, mode=settings.mode, factor=settings.factor, key=msg["id"], info=info)

    def _offload(self, msg: dict, outcome, hidden, elapsed_ms: float, distance: float | None,
                 started: float) -> bytes:
        action, obs = outcome.action, outcome.observation
        payload = {"id": msg["id"], "source": msg.get("source", ""), "seq": msg.get("seq"),
                   "resume_layer": obs.layer,
                   "run_to": self.model.num_layers if action.run_to is None else action.run_to,
                   "threshold": action.threshold,
                   "policy": {"name": self.spec.name, "params": self.spec.params, "cost": self.spec.cost,
                              "cost_overrides": self.spec.cost_overrides, "version": self.spec.version,
                              "ns": self.policy.namespace()},
                   "context": outcome.context,
                   "trace": {"device_layers": outcome.trace.device_layers,
                             "device_exits": outcome.trace.device_exits, "tier": outcome.trace.tier},
                   "decision": _decision(obs),
                   "embedding_distance": distance,
                   "ts": msg["ts"], "ts_device": started, "latency_device_ms": elapsed_ms}
        if obs.layer == 0:
            payload["text"] = msg["text"]
            if msg.get("text_pair") is not None:
                payload["text_pair"] = msg["text_pair"]
        else:
            payload.update(messages.encode_hidden(hidden.numpy(), self.hidden_encoding))
        topic = self.topics.offload_edge if action.tier == "edge" else self.topics.offload_cloud
        return envelope(topic, msg["id"], messages.encode("offload", payload))

    # -- delayed rewards -------------------------------------------------------------------------
    def _learn_feedback(self, feedback: list) -> list[SampleCommit]:
        from stream.costs import Trace
        commits, views = [], {}
        for record, msg in feedback:
            spec = msg["policy"]
            try:
                policy = self._policy_for(spec)
            except (ConfigError, KeyError, TypeError) as exc:
                commits.append(self._reject(record, f"policy of feedback cannot be built: {exc}"))
                continue
            ns = policy.namespace()
            decided_in = str(spec.get("ns") or "")
            if split_namespace(decided_in)[0] == policy.base_namespace():
                ns = decided_in   # the epoch whose state made the decision learns its reward
            if ns not in views:
                views[ns] = StateView(self.checkpoint.state(ns))
            try:
                trace = Trace(**{k: msg["trace"][k] for k in Trace.__dataclass_fields__ if k in msg["trace"]})
                fb = Feedback(msg["exit_layer"], np.asarray(msg["probs"], dtype=np.float32))
                if fb.probs.shape != (self.model.num_classes,) or not 1 <= fb.exit_layer <= self.model.num_layers:
                    raise ValueError(f"feedback {msg['id']!r} needs {self.model.num_classes} probabilities and an "
                                     f"exit layer in 1..{self.model.num_layers}, got {fb.probs.shape[0] if fb.probs.ndim else 0} "
                                     f"and {fb.exit_layer!r}")
                delta = policy.learn(feedback_event(msg["id"], msg["context"], trace, fb), views[ns])
            except (KeyError, TypeError, ValueError, ConfigError) as exc:
                commits.append(self._reject(record, f"feedback does not fit policy {spec.get('name')!r}: "
                                                    f"{type(exc).__name__}: {exc}"))
                continue
            views[ns].add(delta)
            commits.append(SampleCommit(msg["id"], part_key(record), dedup=f"feedback:{ns}:{msg['id']}",
                                        updates=encode_updates(ns, delta) + [resolved(ns, msg["id"])],
                                        record=record))   # a duplicate (or expired pull) is dead-lettered
        return commits

    def _policy_for(self, spec: dict) -> Policy:
        key = f"{spec.get('name')}|{spec.get('params')}|{spec.get('cost')}|{spec.get('cost_overrides')}"
        if key not in self._feedback_policies:
            active = ActiveSpec(spec["name"], dict(spec.get("params") or {}), spec.get("cost", "splitee"),
                                dict(spec.get("cost_overrides") or {}))
            self._feedback_policies[key] = active.build(self.model.num_layers, self.model.num_classes)
        return self._feedback_policies[key]


def _decision(obs: Observation) -> dict:
    conf = float(np.max(obs.probs[obs.layer])) if obs.layer in obs.probs else None
    return {"layer": obs.layer, "confidence": conf}
