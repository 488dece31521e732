"""DeepSeek-MoE v1's configuration and modeling code, copied beside the weights of DeepSeek outputs (not imported
by moeforge)."""
