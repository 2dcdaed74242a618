"""The edge and cloud stages: resume the forward pass from the handed-over hidden state.

An offload carries the hidden state of the device's split layer, float16 or int8 per token as its
``encoding`` says (or the raw input when nothing ran there); the remote stage never recomputes the
device's layers. The offload's real size goes into the sample's trace, so a cost model with a link
prices it by its bytes. It runs on to ``run_to`` (exiting
early at the offload's threshold, DIMEE's edge), publishes the sample's result, and sends the policy
what it needs to score its decision (the exit's probabilities, e.g. C_L) on ``feedback``.
"""

from __future__ import annotations

import logging
import time

from stream import messages
from stream.checkpoint import SampleCommit
from stream.costs import Trace, preset
from stream.errors import ConfigError, MessageError

from consumers.records import result_record
from consumers.runner import ModelRunner
from consumers.worker import StageWorker, WorkerConfig, dlq_envelope, envelope, part_key, reason_kind
from policies.base import Offload
from policies.engine import remote_trace, run_remote

log = logging.getLogger(__name__)


class RemoteWorker(StageWorker):
    """``stage`` is ``edge`` or ``cloud``; both run the same code on their own offload topic."""

    def __init__(self, config: WorkerConfig, model, stage: str = "cloud", max_len: int = 128,
                 metrics=None) -> None:
        if stage not in ("edge", "cloud"):
            raise ConfigError(f"remote stage must be 'edge' or 'cloud', got {stage!r}")
        self.stage = stage
        super().__init__(config, metrics)
        self.model = model
        self.max_len = max_len

    def inputs(self) -> list[str]:
        return [self.topics.offload_edge if self.stage == "edge" else self.topics.offload_cloud]

    def _validate(self, record) -> dict:
        msg = messages.decode("offload", record.value, max_bytes=self.config.max_message_bytes,
                              max_text=self.config.max_text_chars)
        where = f"offload {msg['id']!r} ({record.topic}[{record.partition}]@{record.offset})"
        L = self.model.num_layers
        if not 0 <= msg["resume_layer"] < msg["run_to"] <= L:
            raise MessageError(f"{where}: need 0 <= resume_layer < run_to <= {L}, got "
                               f"{msg['resume_layer']} and {msg['run_to']}")
        if msg["resume_layer"] == 0:
            if not isinstance(msg.get("text"), str) or not msg["text"].strip():
                raise MessageError(f"{where}: resumes at layer 0 but carries no raw text")
        else:
            msg["hidden"] = messages.decode_hidden(msg, where=where, last_dim=self.model.hidden_size,
                                                   max_tokens=self.max_len)
        if msg["trace"]["tier"] != self.stage:
            raise MessageError(f"{where}: offloaded to tier {msg['trace']['tier']!r} but read by the {self.stage} stage")
        try:
            preset(msg["policy"].get("cost", "splitee"), num_layers=self.model.num_layers,
                   **(msg["policy"].get("cost_overrides") or {}))
        except (ConfigError, TypeError, ValueError) as exc:
            raise MessageError(f"{where}: bad cost model in the policy reference: {exc}") from None
        threshold = msg.get("threshold")
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise MessageError(f"{where}: threshold must be a number in [0, 1] or absent, got {threshold!r}")
        return msg

    def process(self, records: list) -> list[SampleCommit]:
        import torch
        started = time.time()
        valid, commits = [], []
        for record in records:
            try:
                valid.append((record, self._validate(record)))
            except MessageError as exc:
                reason = str(exc)
                log.warning("%s: rejected %s[%d]@%d to the DLQ: %s", self.stage, record.topic, record.partition,
                            record.offset, reason)
                if self.metrics:
                    self.metrics.dlq(reason_kind(reason))
                commits.append(SampleCommit(f"{record.topic}:{record.partition}:{record.offset}", part_key(record),
                                            outputs=[dlq_envelope(self.topics, self.stage, record, reason)]))
        if not valid:
            return commits
        msgs = [m for _, m in valid]
        with torch.inference_mode():
            items = [None] * len(msgs)
            raw = [i for i, m in enumerate(msgs) if m["resume_layer"] == 0]
            if raw:
                pairs = [msgs[i].get("text_pair") for i in raw]
                batch = self.model.tokenize([msgs[i]["text"] for i in raw],
                                            pairs if any(p is not None for p in pairs) else None, self.max_len)
                h0, m0 = self.model.start(batch)
                for j, (h, m) in zip(raw, self.model.unbatch(h0, m0)):
                    items[j] = (h, m)
            for i, m in enumerate(msgs):
                if items[i] is None:
                    h = torch.from_numpy(m["hidden"])[None]
                    items[i] = (h, torch.ones(1, h.shape[1], dtype=torch.long))
            hidden, mask = self.model.collate(items)
            runner = ModelRunner(self.model, hidden, mask)
            offloads = [Offload(self.stage, m["run_to"], m.get("threshold")) for m in msgs]
            outcomes = run_remote([m["resume_layer"] for m in msgs], offloads, self.model.num_layers, runner)
        elapsed_ms = (time.time() - started) * 1000.0
        for (record, msg), outcome in zip(valid, outcomes):
            device = Trace(**{k: v for k, v in msg["trace"].items() if k in ("device_layers", "device_exits", "tier")},
                           offload_bytes=len(record.value))
            trace = remote_trace(device, outcome)
            spec = msg["policy"]
            cost = preset(spec.get("cost", "splitee"), num_layers=self.model.num_layers,
                          **(spec.get("cost_overrides") or {}))
            policy_ref = {"name": spec["name"], "version": spec["version"], "ns": spec["ns"]}
            result = result_record(msg, trace, cost, outcome.probs, outcome.exit_layer, policy_ref,
                                   decision=msg.get("decision") or {"layer": msg["resume_layer"], "confidence": None},
                                   stage=self.stage, latency_device_ms=msg.get("latency_device_ms", 0.0),
                                   latency_remote_ms=elapsed_ms, bytes_offloaded=len(record.value),
                                   embedding_distance=msg.get("embedding_distance"),
                                   ts_device=msg.get("ts_device"), ts_remote=started)
            feedback = {"id": msg["id"], "policy": spec, "context": msg["context"],
                        "trace": {"device_layers": trace.device_layers, "device_exits": trace.device_exits,
                                  "tier": trace.tier, "edge_layers": trace.edge_layers,
                                  "cloud_layers": trace.cloud_layers, "offload_bytes": trace.offload_bytes},
                        "exit_layer": outcome.exit_layer, "probs": [float(x) for x in outcome.probs]}
            if self.metrics:
                self.metrics.result(result)
            commits.append(SampleCommit(
                msg["id"], part_key(record), dedup=f"{self.stage}:{msg['id']}",
                outputs=[envelope(self.topics.results, msg["id"], messages.encode("result", result)),
                         envelope(self.topics.feedback, msg["id"], messages.encode("feedback", feedback))],
                record=record))
        if self.metrics:
            self.metrics.latency(elapsed_ms / 1000.0)
        return commits
