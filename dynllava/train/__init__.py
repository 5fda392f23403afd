"""Training: the base LLaVA from scratch on shape scenes, and the Dynamic-LLaVA predictors (the paper's way)."""
