"""Upstream side: the SMTP client toward the smarthost, and the local Maildir fallback."""
