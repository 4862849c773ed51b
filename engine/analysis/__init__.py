"""The one-pass analysis that fills a build file: `analyze` (pipeline), its statistics,
examples, tables, logit effects and feature map."""
