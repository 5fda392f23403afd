"""Dynamic-LLaVA: vision-text context sparsification for LLaVA-family models."""
