"""What analysts and supervisors work with: cases on alerts, the case file, the queue, the
overview, users, API keys, the sign-in throttle and the terminal directory. The API and the
console read and change the node's data through these modules."""
