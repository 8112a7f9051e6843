"""storvisor.integrations"""
