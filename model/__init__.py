"""Backbones, margins and the classification heads (AttFC, FC, Partial FC)."""
