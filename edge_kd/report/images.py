"""Pictures of images: a grid of them, a row per class (the synthesize stage's ``grid.png``, which the report shows).

Apart from ``edge_kd.report.report`` so that the stage that draws it does not run the report's code: a change to the
report reruns the report alone.
"""
from __future__ import annotations

import io


#: the most classes a grid shows, a row each (a picture of a thousand rows is read by nobody)
MAX_ROWS = 20


def image_grid_png(images, labels, class_names, per_class: int, title: str) -> bytes:
    """Returns PNG bytes of a grid of uint8 ``images`` (N, H, W, C): a row per class of ``labels`` (the first
    ``MAX_ROWS`` classes, the title then saying so), its first ``per_class`` images, the class named at the row's
    start."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    classes = min(len(class_names), MAX_ROWS)
    if classes < len(class_names):
        title = f"{title}: the first {classes} of {len(class_names)} classes"
    per_class = max(1, min(per_class, max(int(np.sum(np.asarray(labels) == c)) for c in range(classes))))
    cell = 0.9 if images.shape[1] <= 64 else 1.4
    fig = Figure(figsize=(1.8 + per_class * cell, 0.5 + classes * cell), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(classes, per_class, squeeze=False))
    for c in range(classes):
        chosen = np.flatnonzero(np.asarray(labels) == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(chosen):
                img = images[chosen[j]]
                if img.shape[-1] == 1:
                    ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255)
                else:
                    ax.imshow(img)
        axes[c, 0].set_ylabel(str(class_names[c]), rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()
