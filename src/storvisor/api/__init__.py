"""storvisor.api"""
