"""modules/call_queue.py: the lock every GPU job of the Web-UI holds."""
import threading

queue_lock = threading.Lock()
