"""The report of `imprint-jax evaluate`: metrics.json's protocol line and the Markdown table,
beside the paper's figures (Table 2)."""

from __future__ import annotations

from typing import Any

TESTSETS = ("pixabay", "dreambooth")
# The paper's Table 2 (IMPRINT), for reference in the Markdown table; never measured here.
PAPER = {"pixabay": {"fid": 16.4487, "clip": 96.1875, "dino": 94.705, "dreamsim": 0.0831},
         "dreambooth": {"fid": None, "clip": 77.0625, "dino": 43.4463, "dreamsim": 0.2898}}
METRICS = ("fid", "clip", "dino", "dreamsim")
HEADERS = {"fid": "FID ↓", "clip": "CLIP-score ↑", "dino": "DINO-score ↑",
           "dreamsim": "DreamSim ↓"}


def protocol_text(testset: str, fid_resize: str) -> str:
  crop = ("square crop centred on the region's box, real context kept" if testset == "pixabay"
          else "square crop centred on the region's box, background outside the region white")
  fid = (f"FID: full composites vs real targets, Inception pool3, {fid_resize} resize to 299"
         if testset == "pixabay" else "FID: not applicable (no real composites)")
  return (f"CLIP/DINO: 100 x cosine(generated object, reference object), {crop}; DreamSim:"
          f" distance on the same crops; {fid}.")


def _fmt(key: str, value: float | None) -> str:
  if value is None:
    return "-"
  return f"{value:.4f}" if key == "dreamsim" else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
  """The report as a Markdown table with its protocol, settings and skipped metrics."""
  lines = [f"# imprint-jax evaluate: {report['testset']} (split {report['split']},"
           f" {report['pairs']} pairs)", "",
           "| method | " + " | ".join(HEADERS[k] for k in METRICS) + " |",
           "|---|" + "---:|" * len(METRICS)]
  for name, r in report["methods"].items():
    lines.append(f"| {name} | " + " | ".join(_fmt(k, r.get(k)) for k in METRICS) + " |")
  for name, r in report["paper"].items():
    lines.append(f"| *{name}* | " + " | ".join(_fmt(k, r.get(k)) for k in METRICS) + " |")
  lines += ["", f"Protocol: {report['protocol']}", "",
            "Settings: " + ", ".join(f"{k} {v}" for k, v in report["settings"].items())]
  if report["skipped"]:
    lines += ["", "Skipped:"] + [f"- {k}: {v}" for k, v in report["skipped"].items()]
  lines.append("")
  return "\n".join(lines)
