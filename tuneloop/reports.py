"""Pictures for the HTML reports (evaluation, datasets, drift): self-contained pages."""

from __future__ import annotations


def png_base64(fig) -> str:
    """Return a matplotlib figure as base64 PNG, to embed in a self-contained HTML report."""
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()
