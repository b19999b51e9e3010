"""An application package for the allowlist tests of issue 20."""
