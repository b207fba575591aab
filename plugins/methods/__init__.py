"""Methods: the instruction-backtranslation family, one plugin each, templates in prompts/<method>/."""
