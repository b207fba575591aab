"""Commands that plugins add to the btkit CLI (eval-judge)."""
