"""`pcam slides`: whole slides scored with the exported WSInfer model, through WSInfer's own
tissue segmentation, patching and inference, plus what WSInfer does not write: a summary per
slide, a heatmap, a cohort table, and a cohort that goes on past a failing slide
(docs/slides.md)."""
