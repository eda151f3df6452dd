"""The efficiency benchmark: adapters against full fine-tuning and against peft, and its report."""
