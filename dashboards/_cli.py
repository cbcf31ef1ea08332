"""``ringwatch dashboards export DIR`` and ``ringwatch dashboards push --url URL``: thin
commands over :mod:`ringwatch.dashboards`."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_export(args) -> int:
    from ringwatch.dashboards._export import export

    for path in export(args.dir):
        print(path)
    return 0


def cmd_push(args) -> int:
    from grafana_client.client import GrafanaException

    from ringwatch.dashboards._export import build_all
    from ringwatch.dashboards._push import push, read_token

    token = read_token(args.token_file)
    dashboards = {uid: json.loads(text) for uid, text in build_all().items()}
    try:
        answers = push(args.url, token, dashboards, folder=args.folder,
                       datasource_uid=args.datasource_uid, timeout_s=args.timeout_s)
    except GrafanaException as exc:
        print(f"ringwatch dashboards push: Grafana refused: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ringwatch dashboards push: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    for uid, answer in zip(dashboards, answers, strict=True):
        print(f"{uid}: {answer.get('status', 'success')} {answer.get('url', '')}".rstrip())
    return 0


def add_parsers(sub) -> None:
    d = sub.add_parser("dashboards", help="the Grafana dashboards: write them out or upload "
                       "them", description="ringwatch's Grafana dashboards (fleet, job, "
                       "node/GPU, power, ringwatch itself), built from the metric table.")
    dsub = d.add_subparsers(dest="dashboards_cmd", required=True)
    ex = dsub.add_parser("export", help="write <uid>.json of every dashboard into DIR",
                         description="Write every dashboard as Grafana JSON into DIR "
                         "(for file provisioning: deploy/grafana/provisioning/).")
    ex.add_argument("dir", help="folder to write into (made if missing)")
    ex.set_defaults(func=cmd_export)
    pu = dsub.add_parser("push", help="upload every dashboard to a Grafana",
                         description="Create the folder if it is missing and upload every "
                         "dashboard into it, replacing earlier versions. The token (a "
                         "service account token) comes from GRAFANA_TOKEN or --token-file, "
                         "never from the command line.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         allow_abbrev=False)  # `--token x` must not pass for --token-file
    pu.add_argument("--url", required=True, help="Grafana's base URL, e.g. "
                    "https://grafana.example.com")
    pu.add_argument("--folder", default="ringwatch", help="folder title")
    pu.add_argument("--datasource-uid", help="uid of the Prometheus data source the "
                    "dashboards start on (default: Grafana's default Prometheus)")
    pu.add_argument("--token-file", metavar="PATH", help="file holding the token (default: "
                    "the GRAFANA_TOKEN environment variable)")
    pu.add_argument("--timeout-s", type=float, default=10.0, help="per-request timeout")
    pu.set_defaults(func=cmd_push)
