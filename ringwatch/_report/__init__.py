"""What ``ringwatch analyze`` shows people: a self-contained HTML page (``--html``), a
coloured terminal summary, and progress on long loads.

Plots are computed by pure functions (frames in, frozen dataclasses out: ``_figures``,
``_power``) and rendered apart (``_svg``, ``_html``, ``_term``).
"""

from ringwatch._report._figures import job_plots
from ringwatch._report._html import write_html
from ringwatch._report._progress import progress_for, quiet

__all__ = ["job_plots", "progress_for", "quiet", "write_html"]
