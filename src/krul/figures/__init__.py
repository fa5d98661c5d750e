"""One module per figure, named by its slug (= experiments/<slug>.yaml = notebooks/<slug>.ipynb).

Each exposes `run(cfg) -> DataFrame`, `claim(df, cfg) -> float | None` and `METRIC`, the name its
YAML's predicate gives the claim; `krul.experiments` assembles them into RUNNERS and CLAIM_METRICS.
Shared pieces: `common` (models, engines, conversations, partial results, predicate helpers),
`quality` (fig4, fig8) and `timing` (fig2, fig5, fig6, fig9).
"""
