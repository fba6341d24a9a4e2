"""`qwen3-sft export`: the adapter merged into the base model, the merge verified, the merged model published."""
