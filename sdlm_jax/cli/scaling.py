"""sdlm-scaling: scaling laws for diffusion (Quokka) and AR (Chinchilla) LMs.

  sdlm-scaling laws                                  the coefficient table and its sources
  sdlm-scaling allocate --compute 1e21               N*, D*, D/N and loss, DLM and AR side by side
  sdlm-scaling allocate --params 1B                  the compute-optimal D and C for N parameters
  sdlm-scaling allocate --params 1B --unique 1B      loss against epochs on U unique tokens
  sdlm-scaling allocate --chips v5p-256 --days 30 --mfu 0.5    hardware time as C, then as --compute
  sdlm-scaling fit --runs runs.csv --out DIR         parametric + IsoFLOP fits, intervals, PNG plots
  sdlm-scaling isoflop --budgets 1e17,3e17,1e18 --sizes 4 --base configs/demo.py --out DIR

Counts accept K, M, B, T suffixes (1B = 1e9). Errors are one line naming the flag and what it
accepts, with exit status 2. The laws live in sdlm_jax/scaling/laws.py, the fits in fit.py,
sweep planning and hardware in plan.py.
"""

import argparse
import os
import sys

# The fits run thousands of L-BFGS steps on 5-vector problems: BLAS threads only add
# synchronisation (25x slower on a loaded 2-core machine). Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # pylint: disable=wrong-import-position

from sdlm_jax.scaling import fit as fit_lib  # pylint: disable=wrong-import-position
from sdlm_jax.scaling import laws  # pylint: disable=wrong-import-position

_SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
_LOSS_NOTE = ("loss: each paper's parametric law on its own data and tokenizer; compare sizes within a law, "
              "not DLM against AR")


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one line and exit 2."""

  def error(self, message):
    sys.stderr.write(f"sdlm-scaling: {message}\n")
    sys.exit(2)


def _amount(flag):
  def parse(text):
    try:
      value = float(text[:-1]) * _SUFFIXES[text[-1].upper()] if text[-1:].upper() in _SUFFIXES else float(text)
    except ValueError:
      value = float("nan")
    if not value > 0 or not np.isfinite(value):
      raise argparse.ArgumentTypeError(f"{flag}={text!r}; allowed values: a positive number such as 1e9 or 1B")
    return value
  return parse


def _budgets(text):
  parse = _amount("--budgets")
  try:
    return sorted(parse(t) for t in text.split(",") if t)
  except argparse.ArgumentTypeError:
    raise argparse.ArgumentTypeError(f"--budgets={text!r}; allowed values: comma-separated FLOPs such as 1e17,3e17") \
        from None


def _si(x: float) -> str:
  for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if x >= 0.9995 * scale:  # 999.6M prints as 1B, not 1e+03M
      return f"{x / scale:.3g}{suffix}"
  return f"{x:.3g}"


def _table(header, rows):
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
  lines.insert(1, "-" * len(lines[0]))
  return "\n".join(lines)


# ---------------------------------------------------------------- laws

def _cmd_laws(_):
  for law in laws.LAWS.values():
    p, f = law.parametric, law.frontier
    print(f"{law.name} ({law.family.upper()})")
    print(f"  L(N, D) = {p.E} + {p.A} / N^{p.alpha} + {p.B} / D^{p.beta}    [{law.sources['parametric']}]")
    print(f"  N_opt = {f.n_coef:.4g} C^{f.n_exp}, D_opt = {f.d_coef:.4g} C^{f.d_exp}    [{law.sources['frontier']}]")
    dc = law.data_constrained
    if dc:
      print(f"  L(N, U, e) = {dc.A} / N^{dc.alpha} + {dc.B} / D'^{dc.beta}, D' = U e^{dc.growth} "
            f"exp(-(max(0, e-1) / R)^{dc.decay}), R = {dc.r_coef} U^{dc.r_u} / N^{dc.r_n}    "
            f"[{law.sources['data_constrained']}]")
  print(f"C = {laws.FLOPS_PER_PARAM_TOKEN:g} N D throughout (N parameters, D training tokens, e epochs, U unique tokens)")


# ---------------------------------------------------------------- allocate

def _allocate_compute(compute):
  rows = []
  for law in laws.LAWS.values():
    for method, r in laws.allocation(law, compute).items():
      rows.append([law.name, law.family, method, _si(r["params"]), _si(r["tokens"]), f"{r['tokens_per_param']:.1f}",
                   f"{r['loss']:.3f}"])
  print(f"compute C = {compute:.3g} FLOPs (C = 6ND)")
  print(_table(["law", "family", "method", "params N", "tokens D", "D/N", "loss"], rows))
  dlm = laws.allocation(laws.LAWS[laws.FAMILY_LAW["dlm"]], compute)["isoflop"]
  ar = laws.allocation(laws.LAWS[laws.FAMILY_LAW["ar"]], compute)["isoflop"]
  print(f"DLM / AR at equal compute (IsoFLOP frontiers): {dlm['tokens'] / ar['tokens']:.2f}x the tokens, "
        f"{dlm['tokens_per_param'] / ar['tokens_per_param']:.2f}x the tokens per parameter")
  print("method: isoflop = the paper's N_opt(C), D_opt(C) power laws; parametric = the minimum of its L(N, D) on C = 6ND")
  print(_LOSS_NOTE)


def _allocate_params(params):
  rows = []
  for law in laws.LAWS.values():
    r = laws.optimal_for_params(law, params)
    rows.append([law.name, law.family, _si(r["tokens"]), f"{r['tokens_per_param']:.1f}", f"{r['compute']:.3g}",
                 f"{r['loss']:.3f}"])
  print(f"compute-optimal training of N = {_si(params)} parameters (IsoFLOP frontiers: C solves N_opt(C) = N, "
        "D = D_opt(C))")
  print(_table(["law", "family", "tokens D", "D/N", "compute C", "loss"], rows))
  print(_LOSS_NOTE)


def _allocate_unique(params, unique, max_epochs):
  law = laws.LAWS[laws.FAMILY_LAW["dlm"]]
  best = law.data_constrained.best_epochs(params, unique, max_epochs)
  epochs = sorted({*[2.0 ** k for k in range(int(np.log2(max_epochs)) + 1)], max_epochs, best})
  rows = [[f"{r['epochs']:.4g}" + (" *" if r["epochs"] == best else ""), _si(r["tokens"]), _si(r["effective_tokens"]),
           f"{r['loss']:.4f}"] for r in laws.epochs_curve(law, params, unique, epochs)]
  top = laws.epochs_curve(law, params, unique, [best])[0]
  print(f"{law.name} data-constrained law: N = {_si(params)} parameters, U = {_si(unique)} unique tokens, "
        f"e = 1..{max_epochs:g} epochs")
  print(_table(["epochs", "tokens", "effective D'", "loss"], rows))
  if best >= max_epochs:
    print(f"more repetition still helps at e = {max_epochs:g} (the loss keeps falling up to --max_epochs)")
  else:
    print(f"repetition stops helping after e* = {best:.1f} epochs ({_si(unique * best)} tokens): the predicted loss "
          f"is lowest there ({top['loss']:.4f}, D' = {top['effective_tokens'] / unique:.1f} U) and every further "
          "epoch raises it")
  print(f"(criterion: e* minimises L(N, U, e) over [1, {max_epochs:g}], i.e. maximises the effective data D')")


def _cmd_allocate(args, parser):
  modes = [m for m in ("compute", "params", "chips") if getattr(args, m) is not None]
  if args.unique is not None and args.params is None:
    parser.error("--unique needs --params (the data-constrained law depends on N); allowed: --params N --unique U")
  if len(modes) != 1:
    parser.error(f"allocate takes exactly one of --compute, --params, --chips (got {len(modes)}); "
                 "allowed: --compute C | --params N [--unique U] | --chips SLICE --days D --mfu M")
  if args.chips is None and (args.days is not None or args.mfu is not None):
    parser.error("--days and --mfu go with --chips; allowed: --chips SLICE --days D --mfu M")
  if args.params is not None:
    if args.unique is None:
      _allocate_params(args.params)
    else:
      if not args.max_epochs >= 1:
        parser.error(f"--max_epochs={args.max_epochs}; allowed values: a number >= 1")
      _allocate_unique(args.params, args.unique, args.max_epochs)
    return
  compute = args.compute
  if args.chips is not None:
    if args.days is None or args.mfu is None:
      parser.error("--chips needs --days and --mfu; allowed: --chips v5p-256 --days 30 --mfu 0.5")
    from sdlm_jax.scaling import plan  # pylint: disable=import-outside-toplevel
    try:
      hw = plan.hardware_compute(args.chips, args.days, args.mfu, args.num_slices)
    except ValueError as err:
      msg = str(err)
      parser.error(msg if msg.startswith("--") else f"--chips: {msg}")
    compute = hw["compute"]
    print(f"{hw['slice']}: {hw['chips']} {hw['chip']} chips x {hw['peak_flops_per_chip'] / 1e12:g} TFLOP/s peak bf16 x "
          f"MFU {hw['mfu']:g} x {hw['days']:g} days = {compute:.3g} FLOPs")
  _allocate_compute(compute)


# ---------------------------------------------------------------- fit

def _interval(fitted, key, fmt):
  lo_hi = fitted.intervals.get(key)
  return f"[{fmt.format(lo_hi[0])}, {fmt.format(lo_hi[1])}]" if lo_hi else ""


def _cmd_fit(args, parser):
  try:
    runs = fit_lib.read_runs(args.runs)
  except FileNotFoundError:
    parser.error(f"--runs={args.runs!r}: no such file; allowed values: a CSV with columns params,tokens,loss")
  except ValueError as err:
    parser.error(f"--runs: {err}")
  single = runs.single_epoch()
  if len(single.loss) < len(runs.loss):
    print(f"{len(runs.loss) - len(single.loss)} of {len(runs.loss)} runs repeat data (epochs > 1): left out of the "
          "compute-constrained fits")
  try:
    fitted = fit_lib.fit_parametric(single.params, single.tokens, single.loss, starts=args.starts,
                                    bootstrap=args.bootstrap, seed=args.seed)
  except ValueError as err:
    parser.error(f"--runs: {err}")
  law = fitted.law
  print(f"parametric fit L(N, D) = E + A/N^alpha + B/D^beta on {fitted.num_runs} runs (Huber delta "
        f"{fit_lib.HUBER_DELTA:g} on ln L, L-BFGS from the best {args.starts} of "
        f"{np.prod([len(v) for v in fit_lib.GRID.values()])} grid starts; {args.bootstrap} bootstrap resamples, "
        f"{fitted.level:.0%} percentile intervals)")
  rows = [[k, f"{getattr(law, k):.5g}", _interval(fitted, k, "{:.5g}")] for k in fit_lib.COEFFICIENTS]
  s = law.alpha + law.beta
  if s > 0:
    rows.append(["n_exp", f"{law.beta / s:.4f}", _interval(fitted, "n_exp", "{:.4f}")])
    rows.append(["d_exp", f"{law.alpha / s:.4f}", _interval(fitted, "d_exp", "{:.4f}")])
  print(_table(["coefficient", "value", "interval"], rows))
  print("n_exp, d_exp: the fitted law's compute-optimal N ~ C^n_exp, D ~ C^d_exp (C = 6ND)")

  iso = None
  try:
    iso = fit_lib.fit_isoflop(single)
  except ValueError as err:
    print(f"IsoFLOP fit skipped: {err}")
  if iso:
    print(f"IsoFLOP fit: {len(iso.budgets)} budgets (parabola in ln N and in ln D per budget)")
    print(_table(["compute C", "runs", "N_opt", "D_opt", "loss at N_opt"],
                 [[f"{b.compute:.3g}", len(b.loss), _si(b.params_opt), _si(b.tokens_opt), f"{b.loss_opt:.4f}"]
                  for b in iso.budgets]))
    for compute, why in iso.skipped:
      print(f"  budget {compute:.3g} left out: {why}")
    f = iso.frontier
    print(f"N_opt = {f.n_coef:.4g} C^{f.n_exp:.4f}    D_opt = {f.d_coef:.4g} C^{f.d_exp:.4f}")
  if args.noplots:
    return
  from sdlm_jax.scaling import plots  # pylint: disable=import-outside-toplevel
  out = args.out or os.path.dirname(os.path.abspath(args.runs))
  try:
    written = [plots.plot_frontier(iso, law, os.path.join(out, "frontier.png"), laws.get_law(args.reference))]
    if iso:
      written.insert(0, plots.plot_isoflop(iso, os.path.join(out, "isoflop.png")))
  except ImportError as err:
    parser.error(f"--noplots or install matplotlib: {err}")
  print("wrote " + ", ".join(written))


# ---------------------------------------------------------------- isoflop

def _cmd_isoflop(args, parser):
  from sdlm_jax.scaling import plan  # pylint: disable=import-outside-toplevel
  try:
    base = plan.load_config_file(args.base)
  except (ValueError, AttributeError, ImportError) as err:
    parser.error(str(err) if str(err).startswith("--base") else f"--base={args.base!r}: {err}")
  if args.head_dim is not None:
    if args.head_dim < 1:
      parser.error(f"--head_dim={args.head_dim}; allowed values: an integer >= 1")
    base.model.head_dim = args.head_dim
  if args.kv_group is not None:
    heads = base.model.num_heads
    divisors = [g for g in range(1, heads + 1) if heads % g == 0]
    if args.kv_group not in divisors:
      parser.error(f"--kv_group={args.kv_group}; allowed values: divisors of the base's num_heads ({heads}): "
                   f"{', '.join(map(str, divisors))}")
    base.model.num_kv_heads = heads // args.kv_group
  try:
    points, skipped = plan.plan_sweep(base, args.budgets, args.sizes, args.span)
  except ValueError as err:
    parser.error(str(err))
  for budget, layers, why in skipped:
    print(f"left out C = {budget:.3g}, {layers} layers: {why}")
  if not points:
    parser.error(f"--budgets: no (budget, size) gets >= {plan.MIN_STEPS} steps; allowed values: larger budgets")
  manifest = plan.write_sweep(base, points, args.out, args.base)
  print(f"IsoFLOP sweep from {args.base}: layers = heads, d_model = layers x {base.model.head_dim}; "
        f"{base.train.batch_size} x {base.data.seq_len} tokens per step")
  print(_table(["config", "layers", "d_model", "params N", "tokens D", "D/N", "steps", "FLOPs (exact)", "6ND"],
               [[f"{p.name}.py", p.layers, p.d_model, _si(p.params), _si(p.tokens), f"{p.tokens / p.params:.1f}",
                 p.steps, f"{p.flops:.4g}", f"{6 * p.params * p.tokens:.3g}"] for p in points]))
  print(f"wrote {len(points)} configs and {manifest}")


def build_parser():
  parser = _Parser(prog="sdlm-scaling", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  sub.add_parser("laws", help="print the coefficient table with its sources")

  a = sub.add_parser("allocate", help="compute-optimal allocation, DLM and AR side by side")
  a.add_argument("--compute", type=_amount("--compute"), help="training FLOPs C")
  a.add_argument("--params", type=_amount("--params"), help="parameters N")
  a.add_argument("--unique", type=_amount("--unique"), help="unique tokens U (with --params): loss vs epochs")
  a.add_argument("--max_epochs", type=float, default=500.0, help="last epoch count of the --unique curve")
  a.add_argument("--chips", help="TPU slice, e.g. v5p-256, v6e-64, v5p:4x4x4")
  a.add_argument("--num_slices", type=int, default=1, help="slices of --chips (multi-slice)")
  a.add_argument("--days", type=float, help="training days on --chips")
  a.add_argument("--mfu", type=float, help="model FLOPs utilisation on --chips, 0 < mfu <= 1")

  f = sub.add_parser("fit", help="fit the parametric law and the IsoFLOP power laws to runs")
  f.add_argument("--runs", required=True, help="CSV: params,tokens,loss[,unique_tokens,epochs,budget]")
  f.add_argument("--out", help="folder of the PNG plots (default: the CSV's)")
  f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (0: none)")
  f.add_argument("--starts", type=int, default=16, help="L-BFGS runs, from the best grid points")
  f.add_argument("--seed", type=int, default=0)
  f.add_argument("--reference", default="quokka", choices=list(laws.LAWS), help="published frontier on the plot")
  f.add_argument("--noplots", action="store_true", help="print the fits only")

  i = sub.add_parser("isoflop", help="write one config per (budget, size) for an IsoFLOP sweep")
  i.add_argument("--budgets", type=_budgets, required=True, help="comma-separated FLOPs, e.g. 1e17,3e17,1e18")
  i.add_argument("--sizes", type=int, required=True, help="model sizes per budget")
  i.add_argument("--base", required=True, help="base config FILE[:ARG], e.g. configs/demo.py")
  i.add_argument("--out", required=True, help="folder for the configs and sweep.json")
  i.add_argument("--span", type=float, default=10.0, help="largest / smallest target size per budget")
  i.add_argument("--head_dim", type=int, help="the family's head_dim = d_model / layers (default: the base's); "
                 "smaller values give smaller members for small budgets")
  i.add_argument("--kv_group", type=int, help="query heads per kv head of the family (default: the base's); "
                 "depths are its multiples, so 1 makes every depth a member")
  return parser


def main(argv=None):
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command == "laws":
    _cmd_laws(args)
  elif args.command == "allocate":
    _cmd_allocate(args, parser)
  elif args.command == "fit":
    if args.bootstrap < 0 or args.starts < 1:
      parser.error(f"--bootstrap={args.bootstrap}, --starts={args.starts}; allowed values: bootstrap >= 0, "
                   "starts >= 1")
    _cmd_fit(args, parser)
  else:
    _cmd_isoflop(args, parser)


def run():
  main()


if __name__ == "__main__":
  run()
