"""Analysis: diagnose() (rules → findings), the remedy catalogue (plain data) and remedy trials."""
