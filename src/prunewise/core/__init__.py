"""What every layer shares: typed statistics requests and input statistics, and the mask set."""
