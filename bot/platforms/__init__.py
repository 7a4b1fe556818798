"""Platform adapters: each turns platform events into requests and delivers results back."""
