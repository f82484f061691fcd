"""Scheduled feature refresh: re-download what changed, re-normalize, encode only new or changed items.

    cammsr serve                      # serves it on params.orchestration.refresh_cron
    python -m flows.refresh --catalog demo [--recommend]

Per catalog: (demo_source) -> fetch_sources (conditional: ETag / Last-Modified, size+mtime or sha256;
nothing changed = nothing transferred) -> ingest -> encode_text + encode_image (the feature stores
are incremental: unchanged items keep their rows). Then, when ``params.orchestration.refresh_recommend``
(or the ``recommend`` argument) says so, recommend with the model already trained: items the refresh
added are ranked from their content, without retraining. split -> split_features -> train -> evaluate
-> recommend run only when ``params.orchestration.refresh_downstream`` (or the ``downstream`` argument)
says so; otherwise those stages are left for ``dvc repro`` or the pipeline flow, and ``dvc status``
lists them as stale, which is the truth. Every stage goes through dvc.lock like the pipeline flow's.
"""

from __future__ import annotations

import argparse

from prefect import flow

from cammsr.ops.registry import DOWNSTREAM_STAGES, FEATURE_STAGES
from cammsr.ops.stages import Project
from flows.pipeline import run_on_configured_runner

RECOMMEND = "recommend"


def refresh_stages(downstream: bool, recommend: bool = False) -> list[str]:
    """The stages a refresh runs after fetching the sources: the features, then everything downstream
    (``downstream``) or only recommend with the trained model (``recommend``)."""
    if downstream:
        return [*FEATURE_STAGES, *DOWNSTREAM_STAGES]
    return [*FEATURE_STAGES, *([RECOMMEND] if recommend else [])]


@flow(name="refresh-features", log_prints=True)
def refresh_features(catalogs: list[str] | None = None, downstream: bool | None = None,
                     params_path: str = "params.yaml", root: str = ".", recommend: bool | None = None
                     ) -> dict[str, list[dict]]:
    """Refresh the features of ``catalogs`` (default all); ``downstream`` and ``recommend`` None = from params.

    With ``recommend`` (and not ``downstream``) the recommend stage reruns after encoding, with the model
    already trained: a catalog that has no trained model yet is an error of that stage.

    Returns:
        ``{catalog: [one dict per step: fetch_sources, then a summary + target + skipped per stage]}``.
    """
    project = Project.at(root, params_path)
    orchestration = project.params().orchestration
    downstream = orchestration.refresh_downstream if downstream is None else downstream
    recommend = orchestration.refresh_recommend if recommend is None else recommend
    return run_on_configured_runner(catalogs, refresh_stages(downstream, recommend), project, fetch=True,
                                    artifact="refresh")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", action="append", help="catalog name (repeatable; default all)")
    ap.add_argument("--downstream", action=argparse.BooleanOptionalAction, default=None,
                    help="also rerun split -> ... -> recommend (default: params.orchestration.refresh_downstream)")
    ap.add_argument("--recommend", action=argparse.BooleanOptionalAction, default=None,
                    help="rerun recommend with the trained model (default: params.orchestration.refresh_recommend)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    args = ap.parse_args()
    refresh_features(catalogs=args.catalog, downstream=args.downstream, params_path=args.params, root=args.root,
                     recommend=args.recommend)


if __name__ == "__main__":
    main()
