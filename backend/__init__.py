"""The HTTP service Label Studio talks to."""
