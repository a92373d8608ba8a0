"""torch.fx passes that rewrite models into tightly certifiable ones (one module per pass)."""
