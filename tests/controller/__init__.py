"""Tests of testbed.controller."""
