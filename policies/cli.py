"""`exitflow eval` and `exitflow policy list|show|use|reset|calibrate`.

Heavy imports (numpy work, matplotlib, redis) happen inside the commands, so `exitflow --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from stream.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def register(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval", help="run policies over a confidence matrix offline and compare them",
        description="Stream a confidence matrix through one or more policies with the live decision loop "
        "(in-memory state, reshuffled runs) and report accuracy, cost, offloads, exits and regret.")
    ev.add_argument("--matrix", required=True, action="append",
                    help="confidence matrix .npz (exitflow export-matrix); repeat with --in-order for segments")
    ev.add_argument("--in-order", action="store_true",
                    help="keep the --matrix files in order as segments of one stream (each reshuffled within "
                    "itself per run) and report dynamic regret, per-segment arms and the regret after each boundary")
    ev.add_argument("--calibration", metavar="C.npz",
                    help="labelled validation matrix for the policies that need one (splitee α, dimee, eenet)")
    ev.add_argument("--policy", default="all",
                    help="NAME, NAME[k=v,...], a comma list of them, or all (default)")
    _common_cost(ev)
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="policy or calibration setting; with several policies, applied where accepted")
    ev.add_argument("--runs", type=int, default=20, help="reshuffled runs (SplitEE §5.2: 20)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=32, help="samples decided per state snapshot")
    ev.add_argument("--feedback-delay", type=int, default=0,
                    help="batches before an offloaded sample's reward is learned (0: end of its batch)")
    ev.add_argument("--drift-hook", nargs="?", const="", metavar="KEY=VALUE,...",
                    help="run the device worker's drift hook too (its detector on each input embedding's distance "
                    "to the --reference centroids; a detection starts a new epoch of the policy's state); "
                    "settings as for `exitflow policy drift`, e.g. mode=decay,factor=0.3 (default: the workers')")
    ev.add_argument("--reference", metavar="R.npz",
                    help="labelled in-domain matrix whose class centroids the drift hook measures distance to "
                    "(default: --calibration)")
    ev.add_argument("--limit", type=int, help="use only the first N samples of the matrix")
    ev.add_argument("--json", metavar="OUT", help="write every report (with thinned regret curves) here")
    ev.add_argument("--plot", metavar="DIR", help="write regret.png and offload_sweep.png here")
    ev.set_defaults(func=cmd_eval)

    rp = subparsers.add_parser(
        "reproduce", help="run a paper's protocol on our models and write its table beside the paper's numbers",
        description="Runs one paper's own protocol (datasets, splits, runs, baselines, costs) on our models, "
        "fine-tuning and caching the models it needs, and writes its tables, JSON and PNGs into --out. "
        "splitee: Table 2 and Figs. 3-7 across SST-2→IMDb, RTE→SciTail, MRPC→QQP. dimee: Table I and Fig. 3, "
        "in-domain 80/10/10 on SST-2, MRPC, QQP, RTE. eenet: accuracy vs budget on SST-2 and AG News against "
        "BranchyNet, MSDNet, PABEE. deex: exits, accuracy and measured time vs p_d on SST-2 and IMDb. "
        "drift (no paper: issue #12's protocol on SplitEE's costs): plain and drift-aware SplitEE, with and "
        "without the drift hook, on ordered streams (SST-2 dev → IMDb, IMDb alone, IMDb → AG News, the abrupt "
        "and recurring scenarios); --datasets picks streams. all: every one in turn.")
    rp.add_argument("paper", choices=tuple(REPRODUCERS) + ("all",),
                    help="the paper whose protocol to run (drift: issue #12's ordered streams)")
    rp.add_argument("--datasets", help="comma list of datasets (default: the paper's own; see the description)")
    rp.add_argument("--limit", type=int, help="use the first N shuffled target samples (default: all)")
    rp.add_argument("--runs", type=int, default=20, help="reshuffled runs per policy (the paper: 20)")
    rp.add_argument("--sweep-runs", type=int, default=5, help="runs per point of a cost sweep")
    rp.add_argument("--no-sweep", action="store_true", help="skip the cost sweeps")
    rp.add_argument("--seed", type=int, default=0, help="shuffle / split seed of the data and of the runs")
    rp.add_argument("--backbone", default="default", help="backbone of the models to fine-tune (tests: random:L=..)")
    rp.add_argument("--train-limit", type=int, help="train the models on at most N samples (tests)")
    rp.add_argument("--max-len", type=int, help="tokens per input when exporting the matrices (default: per paper)")
    rp.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    rp.add_argument("--out", type=Path, default=Path("artifacts/reproduce"), help="folder for the table, JSON, PNGs")
    rp.set_defaults(func=cmd_reproduce)

    pol = subparsers.add_parser("policy", help="list, inspect, switch, reset and calibrate policies",
                                description="Manage the active policy of a deployment (kept in Redis).")
    sub = pol.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="every policy with its settings")
    ls.set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="the active policy and learned state")
    show.add_argument("name", nargs="?", help="show the state of every namespace of this policy")
    _redis(show)
    show.set_defaults(func=cmd_show)
    drift = sub.add_parser("drift", help="the device workers' drift hook: detector, reset or decay, off switch",
                           description="Settings of the drift hook every device worker runs on the distance of "
                           "each input embedding to its nearest in-domain class centroid (needs --reference): "
                           "kind=adwin|page_hinkley, delta, threshold (page_hinkley), warmup, cooldown, "
                           "mode=reset|decay, factor (decay). Without options: show them.")
    drift.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    drift.add_argument("--off", action="store_true", help="turn the hook off (detections start no epoch)")
    drift.add_argument("--default", action="store_true", help="forget the settings: the workers' defaults apply")
    _redis(drift)
    drift.set_defaults(func=cmd_drift)
    use = sub.add_parser("use", help="make a policy active for every worker (hot swap at a batch boundary)")
    use.add_argument("name")
    use.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    _common_cost(use)
    use.add_argument("--num-layers", type=int, help="layers of the deployed model (default: the default model's, else 6)")
    use.add_argument("--num-classes", type=int, help="classes of the deployed model (default: the default model's, else 2)")
    _redis(use)
    use.set_defaults(func=cmd_use)
    reset = sub.add_parser("reset", help="forget the learned state of one namespace (name:hash)")
    reset.add_argument("namespace")
    _redis(reset)
    reset.set_defaults(func=cmd_reset)
    cal = sub.add_parser("calibrate", help="fit a policy's calibration on a labelled validation matrix")
    cal.add_argument("name")
    cal.add_argument("--matrix", required=True, help="labelled validation matrix .npz")
    cal.add_argument("--out", required=True, help="calibration JSON to write")
    cal.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="calibration setting")
    _common_cost(cal)
    cal.set_defaults(func=cmd_calibrate)


def _common_cost(parser) -> None:
    parser.add_argument("--cost-model", default="splitee", choices=("splitee", "dimee"))
    parser.add_argument("--offload-cost", type=float, metavar="O",
                        help="offload cost o in λ, literal (splitee: edge and cloud; dimee: cloud); default: the "
                        "preset's 12-layer figure scaled by L/12 (splitee: 5λ·L/12)")
    parser.add_argument("--cost", action="append", default=[], metavar="KEY=VALUE",
                        help="override a cost-model field, e.g. mu=0.05 or cloud_fee=2 (repeatable; fields: "
                        "device_layer, device_exit, edge_layer, cloud_layer, offload_edge, offload_cloud, cloud_fee, mu)")


def _redis(parser) -> None:
    parser.add_argument("--redis-url", default=os.environ.get("EXITFLOW_REDIS_URL", DEFAULT_REDIS_URL),
                        help="Redis of the deployment (env EXITFLOW_REDIS_URL)")
    parser.add_argument("--prefix", default="exitflow:", help="Redis key prefix of the deployment")


def _overrides(args) -> dict[str, float]:
    if args.offload_cost is None:
        return {}
    if args.offload_cost < 0:
        raise ConfigError(f"--offload-cost must be >= 0, got {args.offload_cost}")
    if args.cost_model == "dimee":
        return {"offload_cloud": args.offload_cost}
    return {"offload_cloud": args.offload_cost, "offload_edge": args.offload_cost}


def _cost(args, num_layers: int):
    """The chosen preset scaled to ``num_layers`` (the papers' 12-layer figures by L/12), then --offload-cost / --cost."""
    from stream.costs import parse_overrides, preset

    extra = parse_overrides(getattr(args, "cost", None))
    return preset(args.cost_model, num_layers=num_layers, **{**_overrides(args), **extra})


def _model_shape(args) -> tuple[int, int]:
    """--num-layers / --num-classes, defaulting to the default model's (its exitflow_model.json), else 6 and 2."""
    layers, classes = 6, 2
    try:
        from stream.config import default_model_dir
        meta = json.loads((default_model_dir() / "exitflow_model.json").read_text())
        layers, classes = int(meta["num_layers"]), int(meta["num_classes"])
    except (OSError, ValueError, KeyError):
        pass
    return (args.num_layers or layers), (args.num_classes or classes)


def _load_matrix(path: str, limit: int | None = None):
    from stream.matrix import ConfidenceMatrix

    matrix = ConfidenceMatrix.load(path)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {limit}")
        sl = slice(0, limit)
        matrix = ConfidenceMatrix(
            probs=matrix.probs[sl], labels=None if matrix.labels is None else matrix.labels[sl],
            embeddings=None if matrix.embeddings is None else matrix.embeddings[sl],
            hidden_bytes=matrix.hidden_bytes, ids=None if matrix.ids is None else matrix.ids[sl], meta=matrix.meta)
    return matrix


def _connect(url: str):
    import redis

    from stream.errors import InfraError
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise InfraError(f"cannot reach Redis at {url} ({exc}); start it with `exitflow up` or pass "
                         f"--redis-url") from None
    return client


def cmd_eval(args) -> int:
    from policies.compare import compare, expand_specs, offload_sweep, plot_regret, plot_sweep, table, thin_curve
    from policies.registry import parse_sets

    from policies.compare import segments_table
    from policies.evaluate import check_segments, concat_segments

    segments = None
    if len(args.matrix) > 1 and not args.in_order:
        raise ConfigError("eval: several --matrix need --in-order (segments of one stream, kept in order)")
    if args.in_order:   # --limit applies to each segment; segments (and sample ids) are named by file stem
        loaded = [(path, _load_matrix(path, args.limit)) for path in args.matrix]
        check_segments(loaded)  # first, so that an error names the files
        matrix, segments = concat_segments([(Path(path).stem, m) for path, m in loaded])
    else:
        matrix = _load_matrix(args.matrix[0], args.limit)
    calibration = _load_matrix(args.calibration) if args.calibration else None
    cost = _cost(args, matrix.num_layers)
    shared = parse_sets(args.set)
    specs = expand_specs(args.policy)
    log = (lambda msg: print(f"exitflow eval: {msg}", file=sys.stderr)) if len(specs) > 1 else None
    kw = dict(shared=shared, calibration=calibration, runs=args.runs, seed=args.seed,
              batch_size=args.batch_size, feedback_delay=args.feedback_delay, log=log, segments=segments,
              hook=_eval_hook(args))
    reports = compare(specs, matrix, cost=cost, **kw)
    print(table(reports))
    if segments is not None:
        print(segments_table(reports))
    sweep = None
    if args.plot:
        kept = [r["spec"] for r in reports]
        print(f"regret curves: {plot_regret(reports, Path(args.plot) / 'regret.png')}")
        sweep = offload_sweep(kept, matrix, cost=cost, **{**kw, "log": None})
        print(f"accuracy and cost vs offload cost: {plot_sweep(sweep, Path(args.plot) / 'offload_sweep.png')}")
    if args.json:
        out = {"matrix": str(args.matrix[0]) if segments is None else [str(m) for m in args.matrix],
               "in_order": segments is not None, "calibration": args.calibration, "cost_model": cost.name,
               "cost": {k: v for k, v in vars(cost).items()}, "runs": args.runs, "seed": args.seed,
               "batch_size": args.batch_size, "feedback_delay": args.feedback_delay,
               "drift_hook": None if kw["hook"] is None else kw["hook"].describe(),
               "reports": [{**{k: v for k, v in r.items() if k != "regret_curve"},
                            "regret_curve": thin_curve(r["regret_curve"])} for r in reports],
               "offload_sweep": sweep}
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {path}")
    return 0


def _eval_hook(args):
    """``--drift-hook``: the hook's settings (validated, errors name the key) and the reference centroids."""
    if args.drift_hook is None:
        return None
    from monitoring.drift import HookSettings, reference_centroids
    from policies.evaluate import DriftHook
    from policies.registry import parse_sets

    reference = args.reference or args.calibration
    if not reference:
        raise ConfigError("eval: --drift-hook needs --reference R.npz (or --calibration): a labelled in-domain "
                          "matrix whose class centroids the detector measures distance to")
    raw = parse_sets([kv for kv in args.drift_hook.split(",") if kv.strip()])
    return DriftHook(HookSettings.from_dict(raw), reference_centroids(reference))


def cmd_list(args) -> int:
    import inspect

    from policies.registry import build, parameters, registry
    from stream.costs import preset

    for name, cls in sorted(registry().items()):
        doc = (inspect.getdoc(cls) or "").splitlines()[0] if inspect.getdoc(cls) else ""
        flags = ["offline only"] if cls.offline_only else []
        try:  # defaults that depend on the model shape or a calibration show as resolved for 6 layers
            default = build(name, cost=preset("splitee", num_layers=6), num_layers=6)
        except ConfigError:
            default = None
            flags.append("needs calibration=FILE")
        if default is not None and hasattr(cls, "calibrate"):
            flags.append("calibration=FILE optional")
        shown = []
        for key, param in parameters(cls).items():
            value = param.default
            if value is None and default is not None and getattr(default, key, None) is not None:
                value = getattr(default, key)
            shown.append(f"{key}={'' if value is inspect.Parameter.empty else value}")
        print(f"{name:<16} {doc}")
        print(f"{'':<16} settings: {', '.join(shown) or '-'}{'  [' + '; '.join(flags) + ']' if flags else ''}")
    return 0


def _policy_for(control, namespace: str):
    """Rebuild the policy of ``namespace`` from what `policy use` recorded (None if unknown)."""
    from policies.registry import build
    from stream.costs import preset

    info = control.namespace_info(namespace)
    if info is None:
        return None
    try:
        return build(info["name"], info["params"],
                     cost=preset(info["cost"], num_layers=info["num_layers"], **info["cost_overrides"]),
                     num_layers=info["num_layers"], num_classes=info["num_classes"])
    except ConfigError:
        return None


def cmd_show(args) -> int:
    import time

    from policies.base import epoch_namespace, split_namespace
    from policies.control import PolicyControl
    from policies.state import RedisStore

    client = _connect(args.redis_url)
    control = PolicyControl(client, prefix=args.prefix)
    store = RedisStore(client, prefix=args.prefix)
    spec = control.current()
    if spec is None:
        print("active policy: none (workers start with their configured default)")
    else:
        print(f"active policy: {spec.name} v{spec.version}  settings {json.dumps(spec.params, sort_keys=True)}  "
              f"cost {spec.cost}{' ' + json.dumps(spec.cost_overrides) if spec.cost_overrides else ''}")
    hook = control.drift_hook()
    print(f"drift hook: {_hook_line(hook)}")
    namespaces = control.namespaces()
    wanted = args.name or (spec.name if spec else None)
    shown = [ns for ns in namespaces if wanted is None or ns.split(":", 1)[0] == wanted]
    known = {ns for ns in (control.redis.hkeys(args.prefix + "namespaces") or [])}
    known = {k.decode() if isinstance(k, bytes) else k for k in known}
    if wanted and not shown:
        print(f"no learned state for {wanted!r} yet")
    for base in sorted({split_namespace(ns)[0] for ns in shown}):
        epoch = control.epoch(base)
        ns = epoch_namespace(base, epoch)
        state = store.snapshot(ns)
        policy = _policy_for(control, base) if base in known else None
        summary = policy.describe(state) if policy is not None else {
            k: (v.round(6).tolist() if hasattr(v, "round") else round(v, 6)) for k, v in sorted(state.items())}
        info = control.namespace_info(base) if base in known else None
        print(f"\n{ns}" + (f"  settings {json.dumps(info['params'], sort_keys=True)}" if info else ""))
        for e in control.epoch_events(base):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])) if e.get("time") else "?"
            action = f"decay x{e.get('factor')}" if e.get("mode") == "decay" else e.get("mode", "reset")
            print(f"epoch {e.get('epoch')}: {action} at sample {e.get('at')} (seq {e.get('seq')}, source "
                  f"{e.get('source')}) by {e.get('reason')}, {when}")
        if epoch:
            print(f"earlier epochs stay readable: {', '.join(epoch_namespace(base, k) for k in range(epoch))}")
        print(json.dumps(summary, indent=1, default=str))
    return 0


def _hook_line(settings) -> str:
    from monitoring.drift import HookSettings
    if settings is None:
        return f"workers' default ({HookSettings().describe()}; needs --reference)"
    return HookSettings.from_dict(settings).describe()


def cmd_drift(args) -> int:
    from monitoring.drift import HookSettings
    from policies.control import PolicyControl
    from policies.registry import parse_sets

    control = PolicyControl(_connect(args.redis_url), prefix=args.prefix)
    if args.default:
        control.set_drift_hook(None)
    elif args.off or args.set:
        raw = {**(control.drift_hook() or {}), **parse_sets(args.set)}
        if args.off:
            raw["enabled"] = False
        elif args.set and "enabled" not in parse_sets(args.set):
            raw["enabled"] = True
        control.set_drift_hook(HookSettings.from_dict(raw).as_dict())  # validated before it is written
    print(f"drift hook: {_hook_line(control.drift_hook())} (device workers apply it at their next batch)")
    return 0


def cmd_use(args) -> int:
    from policies.control import PolicyControl
    from policies.registry import parse_sets

    params = parse_sets(args.set)
    if "calibration" in params and params["calibration"]:
        params["calibration"] = str(Path(params["calibration"]).resolve())  # workers may run elsewhere
    control = PolicyControl(_connect(args.redis_url), prefix=args.prefix)
    before = control.current()
    layers, classes = _model_shape(args)
    try:
        spec = control.use(args.name, params, cost=args.cost_model, cost_overrides=_overrides(args),
                           num_layers=layers, num_classes=classes)
    except ConfigError as exc:
        still = f"{before.name} v{before.version}" if before else "none"
        print(f"exitflow policy use: error: {exc}; the active policy is still {still}", file=sys.stderr)
        return 1
    print(f"active policy: {spec.name} v{spec.version} {json.dumps(spec.params, sort_keys=True)} "
          f"(workers switch at their next batch)")
    return 0


def cmd_reset(args) -> int:
    from policies.control import PolicyControl

    deleted = PolicyControl(_connect(args.redis_url), prefix=args.prefix).reset(args.namespace)
    print(f"{args.namespace}: {'state deleted' if deleted else 'no state to delete'}")
    return 0


def cmd_calibrate(args) -> int:
    from policies.calibration import save_calibration
    from policies.compare import Calibrator, settings
    from policies.registry import parse_sets, registry

    classes = registry()
    if args.name not in classes:
        raise ConfigError(f"unknown policy {args.name!r}; expected one of {', '.join(sorted(classes))}")
    cls = classes[args.name]
    if not hasattr(cls, "calibrate"):
        raise ConfigError(f"policy {args.name!r} needs no calibration; calibrated ones: "
                          f"{', '.join(sorted(n for n, c in classes.items() if hasattr(c, 'calibrate')))}")
    params = parse_sets(args.set)
    _, cal_keys = settings(cls)
    unknown = set(params) - cal_keys
    if unknown:
        raise ConfigError(f"calibrate {args.name!r}: unknown setting(s) {sorted(unknown)}; it takes "
                          f"{sorted(cal_keys) or 'none'}")
    matrix = _load_matrix(args.matrix)
    data = Calibrator(matrix).calibrate(cls, _cost(args, matrix.num_layers), params)
    path = save_calibration({**data, "matrix": str(args.matrix)}, args.out)
    brief = {k: v for k, v in data.items() if k in ("alpha", "m", "n", "budget", "thresholds", "counts", "validation",
                                                    "validation_accuracy")}
    print(json.dumps(brief, indent=1, default=str))
    print(f"wrote {path}; use it with --set calibration={path}")
    return 0


#: Paper → the module whose ``main(args, log)`` runs its protocol (``policies/reproduce*.py``).
REPRODUCERS = {"splitee": "policies.reproduce", "dimee": "policies.reproduce_dimee",
               "eenet": "policies.reproduce_eenet", "deex": "policies.reproduce_deex",
               "drift": "policies.reproduce_drift"}


def cmd_reproduce(args) -> int:
    import importlib

    if args.runs < 1 or args.sweep_runs < 1:
        raise ConfigError(f"--runs and --sweep-runs must be >= 1, got {args.runs} and {args.sweep_runs}")
    papers = list(REPRODUCERS) if args.paper == "all" else [args.paper]
    for paper in papers:
        log = lambda msg, paper=paper: print(f"exitflow reproduce {paper}: {msg}", file=sys.stderr)  # noqa: E731
        status = importlib.import_module(REPRODUCERS[paper]).main(args, log)
        if status:
            return status
    return 0
