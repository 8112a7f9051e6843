"""storvisor.cli"""
