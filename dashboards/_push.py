"""Upload the dashboards to a Grafana through its HTTP API (``grafana_client``).

The folder is found by title or created; each dashboard is posted to ``/api/dashboards/db``
with ``overwrite`` (a push replaces what an earlier push left). The token is a Grafana service
account token, sent as ``Authorization: Bearer``; it comes from the environment or a file,
never from the command line, where every local user can read it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ringwatch._config import ConfigError

#: Environment variable holding the Grafana service account token.
TOKEN_ENV = "GRAFANA_TOKEN"
DEFAULT_FOLDER = "ringwatch"


def read_token(token_file: str | Path | None) -> str:
    """The token: the first line of ``token_file``, else ``$GRAFANA_TOKEN``.

    Raises:
        ConfigError: Neither gives a token, or the file cannot be read.
    """
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip().splitlines()[0:1]
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file {token_file}: "
                              f"{exc.strerror or exc}") from None
        if not token or not token[0].strip():
            raise ConfigError(f"--token-file {token_file} is empty")
        return token[0].strip()
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(f"no Grafana token: set {TOKEN_ENV} or pass --token-file")
    return token


def folder_uid(title: str) -> str:
    """A folder uid from its title: lower case letters, digits and dashes, at most 40."""
    uid = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]
    return uid or "ringwatch"


def pin_datasource(dashboard: dict, datasource_uid: str) -> dict:
    """A copy of ``dashboard`` whose data source variable starts on ``datasource_uid`` (every
    panel keeps reading ``$datasource``, so it can still be switched)."""
    out = dict(dashboard)
    tmpl = dict(out.get("templating", {}))
    tmpl["list"] = [dict(v, current={"text": datasource_uid, "value": datasource_uid})
                    if v.get("type") == "datasource" else v for v in tmpl.get("list", [])]
    out["templating"] = tmpl
    return out


def push(url: str, token: str, dashboards: dict[str, dict], *, folder: str = DEFAULT_FOLDER,
         datasource_uid: str | None = None, timeout_s: float = 10.0) -> list[dict]:
    """Create ``folder`` if it is missing and post every dashboard into it, overwriting.

    Args:
        url: Grafana's base URL (``https://grafana.example:3000``, or with a sub-path).
        token: Service account token.
        dashboards: ``{uid: dashboard JSON}``.
        folder: Folder title.
        datasource_uid: Start every dashboard on this Prometheus data source.
        timeout_s: Per-request timeout, seconds.

    Returns:
        Grafana's answer to each dashboard's POST (``uid``, ``url``, ``version``, ...).

    Raises:
        grafana_client.client.GrafanaException: Grafana refused a request.
        OSError: Grafana cannot be reached (``niquests``' connection errors are OSErrors).
    """
    from grafana_client import GrafanaApi

    api = GrafanaApi.from_url(url, credential=token, timeout=timeout_s)
    existing = {f.get("title"): f.get("uid") for f in api.folder.get_all_folders()}
    uid = existing.get(folder)
    if uid is None:
        uid = api.folder.create_folder(folder, uid=folder_uid(folder))["uid"]
    answers = []
    for dash in dashboards.values():
        if datasource_uid:
            dash = pin_datasource(dash, datasource_uid)
        body = {"dashboard": {**dash, "id": None}, "folderUid": uid, "overwrite": True,
                "message": "ringwatch dashboards push"}
        answers.append(api.dashboard.update_dashboard(body))
    return answers
