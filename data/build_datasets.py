"""Builds data/intent/{test,train}.jsonl and data/reply/test.jsonl from the hand-written sentences below.

Deterministic (seeded). Test and train use disjoint sentence templates, so a model finetuned on train.jsonl
is measured on phrasings it never saw. Run: python data/build_datasets.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20261121

SLOTS = {
    "item": [
        "headphones",
        "running shoes",
        "coffee maker",
        "phone case",
        "winter jacket",
        "blender",
        "desk lamp",
        "backpack",
        "smartwatch",
        "yoga mat",
        "kettle",
        "bluetooth speaker",
        "office chair",
        "air fryer",
    ],
    "amount": ["12.99", "45", "89.50", "120", "230", "18.40", "560", "75", "1,200", "34.95", "300", "9.99"],
    "merchant": [
        "Amazon",
        "a gas station",
        "Netflix",
        "an online shop",
        "Uber",
        "a hotel in Lisbon",
        "Spotify",
        "the supermarket",
        "Apple",
        "a restaurant",
        "Zalando",
        "eBay",
    ],
    "order": ["#48213", "#90017", "#33560", "#71244", "#12908", "#66431", "#50872", "#27719"],
    "days": ["3 days", "5 days", "a week", "10 days", "two weeks", "4 days", "6 days", "three weeks"],
    "person": ["my mom", "my landlord", "a friend", "my brother", "my sister", "a colleague", "my son"],
    "detail": ["address", "phone number", "email address", "last name", "mailing address", "mobile number"],
}

TEST = {
    "lost_card": [
        "I lost my debit card somewhere downtown, can you block it?",
        "my wallet was stolen with all my cards in it",
        "I can't find my credit card anywhere, please freeze it",
        "someone stole my card at the train station",
        "need a replacement card, mine is gone",
        "Left my card in a taxi last night. What do I do?",
        "please cancel my card immediately, I think I dropped it",
        "my card got swallowed by an ATM and never came back",
        "how do I report a lost card and get a new one?",
        "I misplaced my visa card, block it before someone uses it",
    ],
    "activate_card": [
        "just got my new card in the mail, how do I activate it?",
        "my replacement card arrived, it says it needs activation",
        "how do I turn on the new credit card you sent?",
        "I want to set a PIN for my new debit card",
        "the card you sent me doesn't work yet, do I need to activate it?",
        "Activation of my new card please",
        "where in the app do I activate a card?",
        "received the card today, what are the steps to start using it",
        "can I activate my card by phone?",
        "new card came but the app says inactive",
    ],
    "payment_declined": [
        "my card got declined at {merchant} even though I have money",
        "why was my payment of {amount} rejected?",
        "checkout keeps failing when I try to pay",
        "the payment didn't go through but I have enough balance",
        "transaction declined again, this is embarrassing",
        "I tried paying {amount} online and it says payment failed",
        "card not accepted at {merchant} today, what's wrong",
        "every time I pay with my card it errors out",
        "why does my card keep getting refused?",
        "my online purchase failed at the payment step",
    ],
    "refund_request": [
        "I want my money back for the {item}",
        "when will I get the refund for order {order}?",
        "I was charged twice for the same order, please refund one",
        "please refund the {amount} I paid for a cancelled order",
        "I returned the {item} {days} ago and still no refund",
        "can I get a refund? the product was not what I expected",
        "refund my purchase please",
        "I need the {amount} charge reversed, I never received the goods",
        "how long does a refund take to show on my card?",
        "I'd like a full refund for order {order}",
    ],
    "order_status": [
        "where is my order {order}?",
        "my package was supposed to arrive {days} ago",
        "can you track my {item} delivery?",
        "when will my order be delivered?",
        "order {order} still says processing, what's going on",
        "has my {item} shipped yet?",
        "the tracking number doesn't show any updates",
        "I ordered a {item} last week and haven't heard anything",
        "what's the delivery date for my order?",
        "is my parcel lost? it's been {days}",
    ],
    "cancel_order": [
        "please cancel order {order}",
        "I want to cancel my order before it ships",
        "I ordered the wrong size {item}, cancel it please",
        "stop my subscription from renewing",
        "can I still cancel the order I placed this morning?",
        "cancel my purchase, I changed my mind",
        "I don't need the {item} anymore, cancel the order",
        "how do I cancel an order in the app?",
        "please don't ship order {order}, I want to cancel",
        "end my monthly subscription",
    ],
    "return_item": [
        "how do I return the {item}?",
        "I want to exchange my {item} for a different size",
        "can I send back the {item} I bought {days} ago?",
        "what's your return policy for electronics?",
        "I need a return label for order {order}",
        "the {item} doesn't fit, I'd like to return it",
        "where do I drop off a return?",
        "I want to swap the color of my {item}",
        "is it too late to return something from last month?",
        "start a return for my {item} please",
    ],
    "damaged_item": [
        "my {item} arrived broken",
        "the box was crushed and the {item} inside is damaged",
        "you sent me the wrong item, I ordered a {item}",
        "the {item} stopped working after one day",
        "parts are missing from my order {order}",
        "received a defective {item}",
        "the screen on the {item} is cracked out of the box",
        "my order came with a scratched {item}",
        "the {item} I got is used, not new",
        "package arrived soaking wet and the {item} is ruined",
    ],
    "balance_inquiry": [
        "what's my current balance?",
        "how much money do I have in my checking account",
        "can you show me my last five transactions?",
        "I need my statement for last month",
        "check my savings balance please",
        "what's the available balance on my credit card?",
        "did my salary come in yet? what's my balance",
        "how do I download a bank statement?",
        "list my recent card transactions",
        "how much is left on my account",
    ],
    "transfer_money": [
        "I want to send {amount} to {person}",
        "how do I transfer money to another bank?",
        "my transfer to {person} hasn't arrived",
        "can I make an international transfer?",
        "send {amount} from my savings to my checking",
        "how long does a bank transfer take?",
        "I made a transfer to the wrong account number",
        "set up a recurring transfer of {amount} every month",
        "what's the daily transfer limit?",
        "wire {amount} to {person} please",
    ],
    "fraud_report": [
        "there's a charge from {merchant} I didn't make",
        "I think my account was hacked",
        "someone used my card for {amount} at {merchant}",
        "I got a text asking for my PIN, is that you?",
        "unknown transactions on my statement, please help",
        "I don't recognise a payment of {amount}",
        "a caller pretending to be the bank got my code",
        "my card was charged in another country and I'm at home",
        "report fraud on my account",
        "there are purchases I never authorized",
    ],
    "account_access": [
        "I can't log in to my account",
        "forgot my password, how do I reset it?",
        "my account is locked after too many attempts",
        "I'm not receiving the verification code",
        "the app keeps saying invalid credentials",
        "I changed phones and now 2FA doesn't work",
        "how do I unlock my online banking?",
        "reset password link is not arriving",
        "I can't sign in with face ID anymore",
        "login page gives an error every time",
    ],
    "update_details": [
        "I moved, I need to update my {detail}",
        "change my {detail} please",
        "how do I update my contact details?",
        "I got married and need to change my last name",
        "my {detail} is wrong on the account",
        "please update the {detail} on file",
        "where can I edit my personal information?",
        "new {detail}, how do I change it in the app",
        "I want to change the email I use to log in",
        "update my billing address for future orders",
    ],
    "fees_question": [
        "why was I charged a fee of {amount}?",
        "what is this monthly maintenance fee?",
        "how much interest am I paying on my credit card?",
        "there's a foreign transaction fee on my statement, why?",
        "what are the fees for international transfers?",
        "I was charged an overdraft fee, can you explain",
        "why did you take {amount} as a service charge",
        "what exchange rate did you use for my payment?",
        "is there a fee for withdrawing cash abroad?",
        "explain the charges on my last statement",
    ],
    "close_account": [
        "I want to close my account",
        "please delete my profile and all my data",
        "how do I close my savings account?",
        "I'm switching banks, close everything",
        "terminate my account please",
        "close my credit card account",
        "I no longer want to be a customer, close my account",
        "what do I need to do to shut down my account",
        "delete my shopping account",
        "can I close my account online?",
    ],
    "speak_to_human": [
        "let me talk to a real person",
        "I want to speak to an agent",
        "can I get a human please",
        "transfer me to customer service",
        "stop the bot, I need a person",
        "is there someone I can call?",
        "connect me with a representative",
        "I'd rather chat with a human agent",
        "give me a phone number to speak with someone",
        "agent please",
    ],
}

# Code-switched test sentences (Spanish, German, French, Portuguese, Italian mixed with English).
CODE_SWITCHED = {
    "lost_card": ["perdí mi tarjeta, can you block it please?", "meine Karte ist weg, please block it"],
    "activate_card": ["how do I activer ma nouvelle carte?", "acabo de recibir la tarjeta, how do I activate it"],
    "payment_declined": ["mi pago fue rechazado at checkout", "Zahlung abgelehnt, but I have money on the account"],
    "refund_request": ["quiero un reembolso for my order", "je voudrais un remboursement for the {item}"],
    "order_status": ["wo ist meine Bestellung {order}?", "dónde está mi pedido, it's been {days}"],
    "cancel_order": ["quiero cancelar mi pedido {order}", "bitte storniere my order, I don't need it"],
    "return_item": ["je veux retourner the {item}", "quero devolver o {item}, how does it work"],
    "damaged_item": ["el {item} llegó roto", "the {item} è arrivato danneggiato"],
    "balance_inquiry": ["cuál es mi saldo right now?", "wie viel Geld habe ich on my account"],
    "transfer_money": ["quiero enviar {amount} to {person}", "Überweisung to my landlord, how do I do it"],
    "fraud_report": ["hay un cargo que no reconozco from {merchant}", "il y a une transaction frauduleuse on my card"],
    "account_access": ["no puedo entrar a mi cuenta", "ich kann mich nicht einloggen, password reset please"],
    "update_details": ["quiero cambiar mi dirección", "je dois changer mon numéro de téléphone"],
    "fees_question": ["por qué me cobraron una comisión de {amount}?", "warum diese Gebühr on my statement"],
    "close_account": ["quiero cerrar mi cuenta", "je veux fermer mon compte please"],
    "speak_to_human": ["quiero hablar con una persona", "ich möchte mit einem Menschen sprechen"],
}

# Ambiguous test cases: a gold label and the other label a careful human might also pick.
AMBIGUOUS = [
    ("my card was declined and then I saw a charge from {merchant} I don't know", "fraud_report", "payment_declined"),
    ("the {item} arrived broken, I want my money back", "refund_request", "damaged_item"),
    ("I cancelled my order but still see the charge, refund it", "refund_request", "cancel_order"),
    ("I can't log in and I think someone changed my password", "fraud_report", "account_access"),
    ("my new card doesn't work at the shop", "activate_card", "payment_declined"),
    ("I lost my card, can I talk to someone?", "lost_card", "speak_to_human"),
    ("why did my transfer cost {amount} in fees?", "fees_question", "transfer_money"),
    ("my order never came, I want to cancel it", "cancel_order", "order_status"),
    ("the {item} is the wrong size and I want to exchange it", "return_item", "damaged_item"),
    ("I moved abroad, close my account or update my address?", "close_account", "update_details"),
    ("there is money missing from my balance", "fraud_report", "balance_inquiry"),
    ("my transfer was declined", "transfer_money", "payment_declined"),
    ("return the {item} and give me a refund", "return_item", "refund_request"),
    ("I think my card was stolen, there is a payment of {amount} I didn't do", "lost_card", "fraud_report"),
    ("got charged a fee when my payment failed", "fees_question", "payment_declined"),
    ("I need to update my phone number to get the login code", "update_details", "account_access"),
]

TRAIN = {
    "lost_card": [
        "i lost my card",
        "My card has been stolen, please block it",
        "I dropped my card somewhere yesterday",
        "need to report my card as stolen",
        "my purse was taken and my card was inside",
        "block my card, I can't find it",
        "can you send me a new card? I lost mine",
        "lost credit card, please deactivate it",
        "the card is missing from my wallet",
        "freeze my debit card, it's lost",
        "stolen card, what should I do",
        "someone pickpocketed me and took my card",
    ],
    "activate_card": [
        "activate my card",
        "how to activate a new debit card",
        "I received my new card, how do I start using it",
        "my card needs activation",
        "need help activating the card that just arrived",
        "set up PIN for new card",
        "new credit card activation",
        "can you activate the card you mailed me",
        "card arrived, says I must activate before use",
        "how do I enable my new card in the app",
        "is my new card already active?",
        "my replacement card is not active",
    ],
    "payment_declined": [
        "payment declined",
        "my card was refused at the store",
        "why can't I pay with my card",
        "online payment keeps failing",
        "transaction was rejected",
        "I got a declined message when paying {amount}",
        "the card machine said declined",
        "my payment to {merchant} failed",
        "why is my card not working for payments",
        "purchase blocked at checkout",
        "card declined but balance is fine",
        "payment error when buying online",
    ],
    "refund_request": [
        "refund please",
        "I want a refund for order {order}",
        "give me my money back",
        "where is my refund",
        "I was double charged, refund me",
        "refund for the returned {item}",
        "I'd like to be reimbursed for {amount}",
        "my refund hasn't arrived",
        "please process my refund",
        "can I get my money back for the {item}",
        "charge me back the {amount} please",
        "request a refund for a cancelled purchase",
    ],
    "order_status": [
        "order status",
        "track my order",
        "where's my package",
        "when does my order {order} arrive",
        "has my order shipped",
        "delivery is late",
        "my {item} hasn't arrived yet",
        "tracking shows nothing",
        "status of order {order}",
        "is my order on its way",
        "expected delivery date for my {item}",
        "my parcel is delayed by {days}",
    ],
    "cancel_order": [
        "cancel my order",
        "I want to cancel order {order}",
        "cancel the {item} I ordered",
        "please stop my order from shipping",
        "cancel subscription",
        "how can I cancel a purchase",
        "I placed an order by mistake, cancel it",
        "don't send my order",
        "cancel my monthly plan",
        "I need to cancel what I bought today",
        "cancellation of order {order}",
        "undo my order please",
    ],
    "return_item": [
        "return an item",
        "how to return my {item}",
        "I want to send the {item} back",
        "exchange for a bigger size",
        "return policy",
        "print a return label",
        "can I return the {item}",
        "I'd like to exchange my {item}",
        "how many days do I have to return",
        "return order {order}",
        "the {item} is too small, return it",
        "send back my purchase",
    ],
    "damaged_item": [
        "item arrived damaged",
        "my {item} is broken",
        "wrong item delivered",
        "the {item} is defective",
        "received a damaged package",
        "missing parts in my order",
        "my {item} does not turn on",
        "product came broken",
        "the {item} has a crack",
        "you sent the wrong color",
        "the {item} arrived faulty",
        "order {order} came damaged",
    ],
    "balance_inquiry": [
        "check balance",
        "what's my balance",
        "show my transactions",
        "account balance please",
        "how much do I have",
        "send me my statement",
        "recent transactions",
        "balance on savings",
        "credit card balance",
        "what did I spend this month",
        "view my account activity",
        "get my monthly statement",
    ],
    "transfer_money": [
        "transfer money",
        "send {amount} to {person}",
        "how to send money abroad",
        "my transfer is pending",
        "make a transfer",
        "move money between my accounts",
        "wire transfer instructions",
        "transfer {amount} to savings",
        "did my transfer to {person} go through",
        "international transfer",
        "schedule a transfer",
        "send money to another account",
    ],
    "fraud_report": [
        "fraud on my account",
        "unauthorized transaction",
        "I didn't make this purchase",
        "suspicious charge from {merchant}",
        "my account has been compromised",
        "someone is using my card",
        "report a scam",
        "I was phished",
        "unknown payment of {amount}",
        "charges I don't recognize",
        "my card was cloned",
        "strange transactions on my account",
    ],
    "account_access": [
        "can't log in",
        "reset my password",
        "locked out of my account",
        "forgot password",
        "verification code not received",
        "two factor authentication problem",
        "unlock my account",
        "login not working",
        "I forgot my username",
        "can't access online banking",
        "password reset email missing",
        "my login keeps failing",
    ],
    "update_details": [
        "update address",
        "change my {detail}",
        "edit personal details",
        "I have a new {detail}",
        "change email address",
        "update my contact info",
        "correct my name on the account",
        "new home address",
        "update phone number",
        "change billing address",
        "my {detail} changed",
        "modify account details",
    ],
    "fees_question": [
        "why was I charged a fee",
        "what is this charge",
        "explain fees",
        "overdraft fee",
        "interest charge question",
        "foreign transaction fee",
        "monthly fee",
        "why did I pay {amount} in fees",
        "ATM withdrawal fee",
        "exchange rate applied",
        "service charge on my account",
        "what fees do you charge",
    ],
    "close_account": [
        "close my account",
        "delete my account",
        "I want to cancel my bank account",
        "shut down my account",
        "remove my profile",
        "close savings account",
        "terminate my membership",
        "how to close account",
        "I want to leave and close my account",
        "close credit card",
        "delete all my data",
        "account closure request",
    ],
    "speak_to_human": [
        "human please",
        "talk to an agent",
        "real person",
        "customer service representative",
        "speak with someone",
        "I need a human",
        "call center number",
        "operator",
        "live agent",
        "let me speak to a manager",
        "connect me to support staff",
        "can a person help me",
    ],
}

# Each letter's right-hand neighbour on its QWERTY row (the row's last key: its left-hand one).
KEYBOARD_NEIGHBOURS = dict(zip("qwertyuiopasdfghjklzxcvbnm", "wertyuioposdfghjklkxcvbnmn", strict=True))


def typo(text: str, rng: random.Random) -> str:
    """One or two realistic typos: a swapped pair, a dropped letter or a neighbouring key."""
    chars = list(text)
    for _ in range(rng.choice([1, 2])):
        letters = [i for i, c in enumerate(chars[:-1]) if c.isalpha() and chars[i + 1].isalpha()]
        if not letters:
            break
        i = rng.choice(letters)
        kind = rng.choice(["swap", "drop", "neighbour"])
        if kind == "swap":
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif kind == "drop":
            del chars[i]
        else:
            chars[i] = KEYBOARD_NEIGHBOURS.get(chars[i].lower(), chars[i])
    return "".join(chars)


def fill(template: str, rng: random.Random) -> str:
    out = template
    for slot, values in SLOTS.items():
        while "{" + slot + "}" in out:
            out = out.replace("{" + slot + "}", rng.choice(values), 1)
    return out


def build_intent(rng: random.Random) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    test: list[dict[str, object]] = []
    for label, templates in TEST.items():
        for i, template in enumerate(templates):
            text = fill(template, rng)
            row: dict[str, object] = {"text": text, "label": label}
            if i % 4 == 3:
                row = {"text": typo(text, rng), "label": label, "tags": ["typo"]}
            test.append(row)
            if i < 8:  # a second, differently filled phrasing of most templates, lower-cased like chat input
                second = fill(template, rng).lower()
                test.append(
                    {"text": typo(second, rng), "label": label, "tags": ["typo"]}
                    if i % 3 == 0
                    else {"text": second, "label": label}
                )
        for template in CODE_SWITCHED[label]:
            test.append({"text": fill(template, rng), "label": label, "tags": ["code_switch"]})
    for template, label, alt in AMBIGUOUS:
        test.append({"text": fill(template, rng), "label": label, "ambiguous": True, "alt_label": alt})
    train: list[dict[str, object]] = []
    for label, templates in TRAIN.items():
        for template in templates:
            for variant in range(2):
                text = fill(template, rng)
                if variant == 1:
                    text = typo(text.lower(), rng) if rng.random() < 0.5 else text.capitalize() + "?"
                train.append({"text": text, "label": label})
    rng.shuffle(test)
    rng.shuffle(train)
    return test, train


# Multi-turn complaints: (customer opening, agent question, customer follow-up, summary issue, demands,
# sentiment, apology, resolution steps). Slots are filled per conversation.
COMPLAINTS = [
    (
        "My order {order} with the {item} was supposed to arrive {days} ago and it still isn't here. "
        "This is ridiculous.",
        "I'm sorry to hear that. Could you confirm the delivery address on the order?",
        "It's the same address as always. I paid for express shipping and I want that money back.",
        "Order {order} ({item}) is {days} late despite paid express shipping.",
        ["deliver the order", "refund the express shipping fee"],
        "negative",
        "We are sorry that your order {order} is {days} late, especially after you paid for express shipping.",
        [
            "We will contact the carrier today and send you the new delivery date.",
            "We will refund the express shipping fee to your original payment method.",
        ],
    ),
    (
        "The {item} I received is broken. The casing is cracked and it won't turn on.",
        "That's not the experience we want you to have. When did it arrive?",
        "Yesterday. I need a working one, I bought it as a gift.",
        "The {item} arrived cracked and does not turn on.",
        ["send a working replacement"],
        "negative",
        "We are sorry that your {item} arrived cracked and does not work.",
        [
            "We will send you a free replacement {item} with priority shipping.",
            "We will email you a prepaid label to return the damaged one.",
        ],
    ),
    (
        "I was charged {amount} twice for the same purchase at {merchant}.",
        "Thanks for letting us know. Do both charges show as completed or is one pending?",
        "Both are completed. Refund the duplicate right now please.",
        "A purchase of {amount} at {merchant} was charged twice.",
        ["refund the duplicate charge"],
        "negative",
        "We apologise that your purchase of {amount} at {merchant} was charged twice.",
        [
            "We have opened a dispute for the duplicate charge.",
            "The duplicate {amount} will be refunded to your account within 3 business days.",
        ],
    ),
    (
        "I returned the {item} {days} ago and I still haven't got my refund.",
        "I understand. Do you have the return tracking number?",
        "Yes, it shows delivered to your warehouse. Where is my money?",
        "The refund for the returned {item} has not arrived {days} after the return was delivered.",
        ["issue the refund", "confirm when the money arrives"],
        "negative",
        "We are sorry that your refund for the {item} has not arrived {days} after we received your return.",
        ["We will process your refund today.", "We will email you a confirmation with the expected arrival date."],
    ),
    (
        "My card keeps getting declined while I'm travelling. I'm stuck at a hotel and can't pay.",
        "I'm sorry, that sounds stressful. Which country are you in right now?",
        "Portugal. Please unblock it immediately.",
        "The customer's card is declined abroad while travelling in Portugal.",
        ["unblock the card for use abroad"],
        "negative",
        "We are sorry that your card is being declined while you are travelling in Portugal.",
        [
            "We have removed the security block so your card works abroad again.",
            "We recommend adding your travel dates in the app to avoid future blocks.",
        ],
    ),
    (
        "There's a payment of {amount} at {merchant} on my account that I never made.",
        "Thank you for reporting it. Do you still have your card with you?",
        "Yes, it's in my wallet. Someone must have copied it. I want my money back and a new card.",
        "An unauthorised payment of {amount} at {merchant} was made while the customer had the card.",
        ["refund the unauthorised payment", "issue a new card"],
        "negative",
        "We are sorry that an unauthorised payment of {amount} at {merchant} was taken from your account.",
        [
            "We have blocked your card and ordered a new one.",
            "We have opened a fraud case and will refund the {amount} while we investigate.",
        ],
    ),
    (
        "I ordered a {item} but you sent me something completely different.",
        "Apologies for the mix-up. What item did you receive?",
        "A pair of socks. I need the {item} I paid for, and I'm not paying to send this back.",
        "The customer received the wrong item instead of the ordered {item}.",
        ["send the correct item", "free return of the wrong item"],
        "negative",
        "We apologise for sending you the wrong item instead of your {item}.",
        [
            "We will ship the correct {item} today at no extra cost.",
            "We will send you a free return label for the wrong item.",
        ],
    ),
    (
        "I've been locked out of my account for two days and I have bills to pay.",
        "I'm sorry about that. Have you tried the password reset link?",
        "Of course, the code never arrives. I need access today.",
        "The customer has been locked out for two days and the reset code does not arrive.",
        ["restore account access today"],
        "negative",
        "We are sorry that you have been locked out of your account for two days.",
        [
            "We have unlocked your account and sent a new reset code to your registered phone.",
            "If the code does not arrive within 10 minutes, call us and we will verify you by phone.",
        ],
    ),
    (
        "Why was I charged a {amount} fee? Nobody told me about any fee.",
        "Let me look into that. Which transaction is the fee linked to?",
        "It appeared after a normal card payment. I want it reversed.",
        "An undisclosed fee of {amount} was charged after a card payment.",
        ["reverse the fee", "explain the fee"],
        "negative",
        "We apologise that a fee of {amount} was charged without a clear explanation.",
        [
            "We will reverse the {amount} fee within 2 business days.",
            "We will send you a breakdown of the fees that apply to your account.",
        ],
    ),
    (
        "I cancelled my subscription last month but you charged me {amount} again.",
        "I'm sorry. Did you receive a cancellation confirmation email?",
        "Yes, I still have it. Refund me and make sure it's really cancelled this time.",
        "The subscription was charged {amount} after it had been cancelled.",
        ["refund the charge", "confirm the cancellation"],
        "negative",
        "We are sorry that you were charged {amount} after you cancelled your subscription.",
        [
            "We have confirmed the cancellation of your subscription.",
            "We will refund the {amount} to your payment method within 5 business days.",
        ],
    ),
    (
        "My transfer of {amount} to {person} still hasn't arrived after {days}.",
        "I'm sorry for the delay. Was it a domestic or an international transfer?",
        "Domestic. It was urgent and now I'm getting late fees.",
        "A domestic transfer of {amount} to {person} has not arrived after {days}.",
        ["complete the transfer", "cover the late fees"],
        "negative",
        "We apologise that your transfer of {amount} to {person} has still not arrived after {days}.",
        [
            "We are tracing the transfer with the receiving bank today.",
            "Send us the late fee invoice and we will review it for reimbursement.",
        ],
    ),
    (
        "I waited 45 minutes on the phone and the agent hung up on me.",
        "I'm very sorry to hear that. What were you calling about?",
        "A question about my statement. I want someone to call me back today.",
        "The customer waited 45 minutes on the phone and the call was ended by the agent.",
        ["a call back today"],
        "negative",
        "We are sorry that you waited 45 minutes and that your call was ended before you got help.",
        [
            "A senior agent will call you back today to answer your statement question.",
            "We have shared your feedback with the phone team manager.",
        ],
    ),
    (
        "The {item} arrived but the charger and the manual are missing.",
        "Sorry about that. Was the box sealed when it arrived?",
        "Yes, it was sealed. Please just send the missing parts.",
        "The {item} arrived without its charger and manual.",
        ["send the missing parts"],
        "neutral",
        "We apologise that your {item} arrived without the charger and the manual.",
        ["We will ship the missing charger and manual today at no cost."],
    ),
    (
        "I updated my address weeks ago but my order {order} went to my old apartment.",
        "I'm sorry. Have you been able to contact the new tenants?",
        "No, and I don't want to. Resend the order to my new address.",
        "Order {order} was shipped to the old address although the address had been updated.",
        ["resend the order to the new address"],
        "negative",
        "We are sorry that your order {order} was sent to your old address after you had updated it.",
        [
            "We will resend your order to your new address at no cost.",
            "We have corrected the address on all your open orders.",
        ],
    ),
    (
        "My credit card interest rate is higher than what I was promised when I signed up.",
        "Thank you for raising this. Do you remember which rate you were offered?",
        "It was in the offer letter: a lower introductory rate for a year. I'd like it applied and the extra refunded.",
        "The credit card interest rate is higher than the introductory rate in the offer letter.",
        ["apply the promised rate", "refund the extra interest"],
        "neutral",
        "We apologise that your credit card interest rate does not match the rate in your offer letter.",
        [
            "We will review your offer letter and apply the correct rate.",
            "Any extra interest charged will be refunded to your card account.",
        ],
    ),
    (
        "The app charged me for an order that shows as failed, {amount} is gone from my account.",
        "I'm sorry. Does the order appear in your order history?",
        "It says failed. So I have no order and no money.",
        "A failed order still took {amount} from the customer's account.",
        ["refund the money"],
        "negative",
        "We are sorry that {amount} was taken from your account for an order that failed.",
        [
            "We will release the {amount} to your account within 24 hours.",
            "You can place the order again; we will waive the delivery fee.",
        ],
    ),
]

OPENERS = ["", "Hi. ", "Hello, ", "Good morning. ", "Hey, "]


def render_reply(template: dict[str, str], apology: str, steps: list[str]) -> str:
    numbered = "\n".join(f"{i}. {step}" for i, step in enumerate(steps, 1))
    return f"{template['greeting']}\n\n{apology}\n\n{numbered}\n\n{template['closing']}"


def build_reply(rng: random.Random, templates: dict[str, dict[str, str]]) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for variant in range(4):
        for scenario in COMPLAINTS:
            opening, question, follow_up, issue, demands, sentiment, apology, steps = scenario
            values = {slot: rng.choice(options) for slot, options in SLOTS.items()}
            # The customer says "my son"; support writes "your son"; the summary says "their son".
            yours = {**values, "person": values["person"].replace("my ", "your ")}
            theirs = {**values, "person": values["person"].replace("my ", "their ")}

            def fill_with(text: str, values: dict[str, str] = values) -> str:
                return text.format(**values)

            name = "formal" if variant == 3 else "standard"
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": rng.choice(OPENERS) + fill_with(opening)},
                        {"role": "assistant", "content": question},
                        {"role": "user", "content": fill_with(follow_up)},
                    ],
                    "template": name,
                    "summary": {"issue": fill_with(issue, theirs), "demands": demands, "sentiment": sentiment},
                    "reference": render_reply(
                        templates[name], fill_with(apology, yours), [fill_with(s, yours) for s in steps]
                    ),
                }
            )
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main() -> None:
    import yaml

    rng = random.Random(SEED)
    test, train = build_intent(rng)
    write_jsonl(HERE / "intent" / "test.jsonl", test)
    write_jsonl(HERE / "intent" / "train.jsonl", train)
    templates = yaml.safe_load((HERE / "reply" / "templates.yaml").read_text())
    replies = build_reply(rng, templates)
    write_jsonl(HERE / "reply" / "test.jsonl", replies)
    print(f"intent test {len(test)}, intent train {len(train)}, reply test {len(replies)}")


if __name__ == "__main__":
    main()
