"""GloRo training losses: gloro_ce, trades, emma, cll."""
