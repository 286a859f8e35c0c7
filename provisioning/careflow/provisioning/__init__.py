"""Provisioning: certificate authorities, device certificates, revocation (and the claim flow)."""
