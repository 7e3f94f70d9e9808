"""The search agent's pure parts: the Search-R1 protocol, token masks, FOLR rewards, advantage estimators,
policy losses and group diagnostics. Standard library and torch only: no model, no I/O."""
